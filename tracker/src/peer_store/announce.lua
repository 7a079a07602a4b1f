-- Announces to any swarms, in one call; each one atomically: expire, record, publish, answer.
-- See redis_store.rs for the layout.
--
-- ARGV: 1 peer ttl (ms), 2 max peers, 3 max per address, 4 most peers expired per role in one
-- announce, 5 meta ttl (ms), 6 channel changes are published on ('' for none), 7 publisher
-- (the replica's id), 8 announces in this call; then 10 per announce: info-hash (hex), member
-- (peer id hex '@' ip), ip, event ('stopped', 'completed' or ''), role ('S' or 'L'), zone (''
-- for none), record, now (ms), numwant, answer: 'draw' (numwant records drawn here), 'none',
-- or 'all' (every live peer, as score, record pairs: a replica's mirror loads the swarm).
-- Returns one reply per announce: {status} when refused, else {status, seeders, leechers,
-- seq, ...}; status 0 present, 1 removed, 2 swarm full, 3 address full; seq numbers the
-- swarm's changes (0: none made).
--
-- Every change (a peer recorded or leaving; not an expiry, which each mirror applies by
-- itself) is published as 'publisher|info-hash|seq|U or D|now|record'. Redis runs scripts one
-- at a time and delivers a channel's messages in order, so a mirror that loaded the swarm at
-- seq S applies exactly the messages numbered above S.
--
-- Keys are built here from the info-hash, `fbpkg:swarm:{<hex>}:<what>`: one call serves many
-- swarms, so it cannot declare them (Redis Cluster would need one call per slot).
local ttl, max_peers, max_per_addr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local batch, meta_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local channel, publisher = ARGV[6], ARGV[7]

-- 'dc1/rack7' -> {'dc1', 'dc1/rack7'}: shortest first, whole segments.
local function prefixes(z)
  local out = {}
  if z == nil or z == '' then return out end
  local from = 1
  while true do
    local slash = string.find(z, '/', from, true)
    if not slash then
      out[#out + 1] = z
      return out
    end
    out[#out + 1] = string.sub(z, 1, slash - 1)
    from = slash + 1
  end
end

-- A record is 'role|zone|addr|peer id hex|uploaded|downloaded|left'.
-- The role is 'S' or 'L' whatever the record holds, so counts stay keyed by one of them.
local function parse(old)
  local r, z = string.match(old, '^(%a)|([^|]*)|')
  if r ~= 'S' then r = 'L' end
  return r, z
end

local function announce(hash, member, ip, event, role, zone, rec, now, numwant, answer)
  local base = 'fbpkg:swarm:{' .. hash .. '}:'
  local seeders, leechers, peers = base .. 'seeders', base .. 'leechers', base .. 'peers'
  local addrs, meta, zprefix = base .. 'addr', base .. 'meta', base .. 'z:'

  local function role_key(r)
    if r == 'S' then return seeders end
    return leechers
  end

  local function zone_key(r, p) return zprefix .. r .. ':' .. p end

  local function unzone(m, r, z)
    for _, p in ipairs(prefixes(z)) do redis.call('SREM', zone_key(r, p), m) end
  end

  -- The keys' TTLs are refreshed once every quarter of a peer's TTL per swarm ("chores"), not
  -- on every announce, where they were 5 of its 16 commands (tracker_bench --replicas). They
  -- are set that quarter longer than a peer lives, so no key expires before the last peer it
  -- holds would; an abandoned swarm still disappears by itself. Keys are made only when the
  -- swarm is empty (chores then give every key its TTL) or a role's first peer arrives (its set
  -- gets its TTL there), and zone buckets get theirs on each of their announces.
  local every = math.floor(ttl / 4)
  local keep = ttl + every
  local state = redis.call('HMGET', meta, 'touched', 'swept', 'seq', 'seeders', 'leechers')
  local touched, swept = tonumber(state[1] or '0'), tonumber(state[2] or '0')
  local seq = tonumber(state[3] or '0')
  local chores = now - touched >= every or now < touched
  -- Role counts live in meta, kept in step by every change this script makes; chores count
  -- the sets again, so keys expired or evicted behind its back are caught within a quarter
  -- of a TTL.
  local count
  if chores or not state[4] or not state[5] then
    count = {S = redis.call('ZCARD', seeders), L = redis.call('ZCARD', leechers)}
    chores = true
  else
    count = {S = tonumber(state[4]), L = tonumber(state[5])}
  end
  if count.S + count.L == 0 then chores = true end
  local old = redis.call('HGET', peers, member)
  -- Leaving a swarm one is not in changes nothing (and makes no key).
  if event == 'stopped' and not old then return {1, count.S, count.L, 0} end

  -- Forget a peer entirely (record, buckets, address count, its role's set).
  local function forget(m, prev)
    local r, z = parse(prev)
    unzone(m, r, z)
    if redis.call('ZREM', role_key(r), m) == 1 then count[r] = count[r] - 1 end
    local a = string.match(m, '@(.*)$')
    if a and redis.call('HINCRBY', addrs, a, -1) <= 0 then redis.call('HDEL', addrs, a) end
    redis.call('HDEL', peers, m)
  end

  -- Peers silent since the cutoff go, at most once a second per swarm (so a peer outlives its
  -- TTL by under a second) and a bounded batch per role, so one announce to a swarm left alone
  -- for long never does unbounded work; a full batch leaves the rest to the next announce.
  local sweep_every = math.min(1000, math.floor(ttl / 4))
  local sweep = now - swept >= sweep_every or now < swept
  if sweep then
    local cutoff = now - ttl
    for _, r in ipairs({'S', 'L'}) do
      local k = role_key(r)
      local stale = redis.call('ZRANGEBYSCORE', k, '-inf', '(' .. cutoff, 'LIMIT', 0, batch)
      if #stale == batch then sweep = false end
      for _, m in ipairs(stale) do
        local prev = redis.call('HGET', peers, m)
        if m == member then old = nil end
        if prev then
          forget(m, prev)
        elseif redis.call('ZREM', k, m) == 1 then
          count[r] = count[r] - 1
        end
      end
    end
  end

  -- Write back what meta keeps (counts, change number, sweep and chore marks) in one command.
  -- A swarm nobody announces to disappears by itself: no sweeper, no scan. A meta made here
  -- gets its TTL from the chores that a swarm without `touched` always does.
  local function save(changed)
    local f = {'seeders', count.S, 'leechers', count.L}
    local function put(k, v)
      f[#f + 1] = k
      f[#f + 1] = v
    end
    if changed then
      seq = seq + 1
      put('seq', seq)
    end
    if sweep then put('swept', now) end
    if chores then
      put('touched', now)
      for _, k in ipairs({seeders, leechers, peers, addrs}) do redis.call('PEXPIRE', k, keep) end
    end
    redis.call('HSET', meta, unpack(f))
    if chores then redis.call('PEXPIRE', meta, meta_ttl) end
  end

  if event == 'stopped' then
    -- Its own entry may have gone with the sweep just now (silent past its TTL).
    if not old then
      save(false)
      return {1, count.S, count.L, 0}
    end
    forget(member, old)
  else
    if not old then
      -- Counted first and taken back if refused: one command for the peer that joins.
      local n = redis.call('HINCRBY', addrs, ip, 1)
      local refused = nil
      if n > max_per_addr then
        refused = 3
      elseif count.S + count.L >= max_peers then
        refused = 2
      end
      if refused then
        if n <= 1 then
          redis.call('HDEL', addrs, ip)
        else
          redis.call('HINCRBY', addrs, ip, -1)
        end
        save(false)
        return {refused}
      end
    end
    local was, old_zone = nil, nil
    if old then was, old_zone = parse(old) end
    if (role == 'S' and event == 'completed') or (was == 'L' and role == 'S') then
      redis.call('HINCRBY', meta, 'completed', 1)
      chores = true
    end
    if old and (was ~= role or old_zone ~= zone) then
      unzone(member, was, old_zone)
      if was ~= role and redis.call('ZREM', role_key(was), member) == 1 then
        count[was] = count[was] - 1
      end
    end
    redis.call('HSET', peers, member, rec)
    local first = count[role] == 0
    if redis.call('ZADD', role_key(role), now, member) == 1 then
      count[role] = count[role] + 1
      if first then redis.call('PEXPIRE', role_key(role), keep) end
    end
    for _, p in ipairs(prefixes(zone)) do
      local k = zone_key(role, p)
      redis.call('SADD', k, member)
      redis.call('PEXPIRE', k, keep)
    end
  end

  save(true)
  if channel ~= '' then
    local op = 'U'
    if event == 'stopped' then op = 'D' end
    redis.call('PUBLISH', channel,
      publisher .. '|' .. hash .. '|' .. seq .. '|' .. op .. '|' .. now .. '|' .. rec)
  end
  if event == 'stopped' then return {1, count.S, count.L, seq} end

  local out = {0, count.S, count.L, seq}
  if answer == 'all' then
    -- Silent peers past the cutoff that the sweep has not reached yet are left out.
    local seen_at = {}
    for _, r in ipairs({'S', 'L'}) do
      local live = redis.call('ZRANGE', role_key(r), now - ttl, '+inf', 'BYSCORE', 'WITHSCORES')
      for i = 1, #live, 2 do seen_at[live[i]] = live[i + 1] end
    end
    local all = redis.call('HGETALL', peers)
    for i = 1, #all, 2 do
      local at = seen_at[all[i]]
      if at then
        out[#out + 1] = at
        out[#out + 1] = all[i + 1]
      end
    end
    return out
  end
  if answer ~= 'draw' or numwant <= 0 then return out end
  -- The answer: see sample.rs for the policy. When everyone the asker may get fits in numwant
  -- (its own entry aside; a seeder gets leechers only), the answer is all of them, in any order,
  -- read with one HVALS instead of a draw per level and role.
  local others = count.L
  if role == 'L' then others = count.S + count.L - 1 end
  if others <= numwant then
    for _, r in ipairs(redis.call('HVALS', peers)) do
      if #out - 4 >= numwant then break end
      if r ~= rec and (role == 'L' or string.byte(r, 1) == 76) then out[#out + 1] = r end
    end
    return out
  end
  -- Otherwise a draw: within a role, the closest zone bucket first, then the whole role; never
  -- the asker, never a peer twice.
  local picked, seen, of_role = {}, {[member] = true}, {S = 0, L = 0}
  local levels = prefixes(zone)
  local function fill(r, upto)
    -- levels[#levels] is the closest bucket; 0 stands for the whole role.
    for i = #levels, 0, -1 do
      local need = upto - #picked
      if need <= 0 then return end
      local draw = need + of_role[r] + 1
      local got
      if i == 0 then
        got = redis.call('ZRANDMEMBER', role_key(r), draw)
      else
        got = redis.call('SRANDMEMBER', zone_key(r, levels[i]), draw)
      end
      for _, m in ipairs(got) do
        if not seen[m] and #picked < upto then
          seen[m] = true
          picked[#picked + 1] = m
          of_role[r] = of_role[r] + 1
        end
      end
    end
  end
  if role == 'S' then
    fill('L', numwant)
  else
    fill('S', math.ceil(numwant / 2))
    fill('L', numwant)
    fill('S', numwant)
  end
  if #picked > 0 then
    local recs = redis.call('HMGET', peers, unpack(picked))
    for _, r in ipairs(recs) do
      if r then out[#out + 1] = r end
    end
  end
  return out
end

-- One announce that fails (a bug, a key of the wrong type) answers {-1, why} and does not
-- fail the others of the call: Redis does not undo what they wrote, so they must be answered.
local out = {}
for i = 0, tonumber(ARGV[8]) - 1 do
  local a = 8 + i * 10
  local ok, r = pcall(announce, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9]),
    ARGV[a + 10])
  if ok then
    out[#out + 1] = r
  elseif type(r) == 'table' and r.err then
    out[#out + 1] = {-1, r.err}
  else
    out[#out + 1] = {-1, tostring(r)}
  end
end
return out
