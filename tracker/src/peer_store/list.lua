-- Up to ARGV[2] records of one swarm's live peers (seen at or after ARGV[1] ms), seeders
-- first, for the dashboard and /api/v1/swarms. KEYS: seeders zset, leechers zset, the swarm's hash (records
-- under 'p:' and the member).
local out = {}
for _, k in ipairs({KEYS[1], KEYS[2]}) do
  local room = tonumber(ARGV[2]) - #out
  if room <= 0 then break end
  local members = redis.call('ZRANGEBYSCORE', k, ARGV[1], '+inf', 'LIMIT', 0, room)
  if #members > 0 then
    for i, m in ipairs(members) do members[i] = 'p:' .. m end
    for _, r in ipairs(redis.call('HMGET', KEYS[3], unpack(members))) do
      if r then out[#out + 1] = r end
    end
  end
end
return out
