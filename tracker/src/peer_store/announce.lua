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
-- seq, oldest, ...}; status 0 present, 1 removed, 2 swarm full, 3 address full; seq numbers
-- the swarm's changes (0: none made); oldest is a bound (ms) at or below every score left in
-- the swarm's sets (a replica writing without this script calls it again once a peer may be
-- stale: redis_store.rs, `plain`).
--
-- Every change (a peer recorded or leaving; not an expiry, which each mirror applies by
-- itself) is a line 'publisher|info-hash|seq|U or D|now|record', and a call publishes its
-- changes' lines in one message, in the order it made them ('\n' between lines: neither
-- records nor zones hold one). Redis runs scripts (and transactions) one at a time and
-- delivers a channel's messages in order, so a mirror that loaded the swarm with the change
-- numbered S applies exactly what follows that change's line on the channel. One message
-- per call, not per change, because PUBLISH and each message a replica decodes cost more
-- than the line itself. Replicas also write peers that announce again, or join below half
-- the limits, without this script, in a MULTI that publishes lines numbered 0
-- (redis_store.rs, `plain`): so the script counts the role sets (ZCARD) rather than keep
-- counts those writes would not move.
--
-- Keys are built here from the info-hash, `fbpkg:v5:{<hex>}:<what>`: one call serves many
-- swarms, so it cannot declare them (Redis Cluster would need one call per slot).
--
-- What one swarm's announce reads and writes of its hash (`swarm`: records, address counts
-- and the swarm's own state) goes in one HMGET first and one HSET (and an HDEL when anything
-- leaves) last, so a peer that joins costs three commands: HMGET, ZADD, HSET (zone buckets,
-- sweeps and chores aside), and a call one PUBLISH. Each was a command of its own before (8.4
-- per announce, tracker_bench --replicas). The swarm's own state is one field, `st`:
-- 'touched swept seq oldest'. The hash of a busy swarm is a hashtable too big for the
-- CPU's caches, so each field an announce reads first is a few cache misses: HMGET was a
-- quarter of Redis's time while the state took six fields.
local ttl, max_peers, max_per_addr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local batch, meta_ttl = tonumber(ARGV[4]), ARGV[5]
local channel, publisher = ARGV[6], ARGV[7]

-- The keys' TTLs are refreshed once every quarter of a peer's TTL per swarm ("chores"), not on
-- every announce. They are set that quarter longer than a peer lives, so no key expires before
-- the last peer it holds would; an abandoned swarm still disappears by itself. Keys are made
-- only when the swarm is empty (chores then give every key its TTL) or a role's first peer
-- arrives (its set gets its TTL there), and zone buckets get theirs on each of their announces.
local every = math.floor(ttl / 4)
local keep = ttl + every
-- Numbers go to redis.call as strings written here: Redis writes a Lua number with '%.17g',
-- which took a few percent of its time.
local keep_s = string.format('%d', keep)
-- Peers silent since the cutoff go at most once a second per swarm (so a peer outlives its TTL
-- by under a second), a bounded batch per role, and only when one may be due: the hash keeps
-- `oldest`, at or below the oldest score in either role's set (a peer announcing again only
-- raises the true minimum). Without it every announce to a swarm announced to less than once
-- a second (most swarms of a fleet) paid two ZRANGEBYSCOREs that found nothing.
local sweep_every = math.min(1000, every)
-- This call's change lines, published together at its end.
local changes = {}

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

-- Each Lua allocation costs about a third of a microsecond in redis-server here, and made most
-- of the script's time (tracker_bench --replicas), so the common path (a peer announcing again
-- or joining) allocates little: keys are built when used, tables are sized where they are
-- made, and the state of the announce being served lives in these locals, which the
-- functions below share (made once per call, not once per announce).
local swarm, hkey     -- the swarm's info-hash (hex) and its hash's key
local nS, nL          -- its role counts
local pending         -- other peers' fields the hash is to get (field -> value, or false for
                      -- one that goes), written by `flush`: made by a sweep or a leave only
local addrs           -- address counts read so far (ip -> peers), made by a sweep or a leave
local ip, ip_n        -- the announcer's address and its count, read by every announce
local now_s, now      -- now (ms, as given, and as a number)
local touched, swept  -- the marks to save (ms)
local oldest          -- a bound at or below every score in the swarm's sets (ms)
local seq             -- the swarm's change number

-- The state field: '##' (a record's second byte is '|', an address count's a digit, so a draw
-- reading the hash's values tells them apart), then touched, swept, seq and oldest as
-- doubles (exact for these integers). Packed rather than written in digits: parsing the
-- numbers out of text and writing them back made a Lua string each per announce.
local STATE, STATE_LEN = '<BBdddd', 34
local function state()
  return struct.pack(STATE, 35, 35, touched, swept, seq, oldest)
end

-- Whether a number unpacked from a state field can be one: whole, not negative, exact in a
-- double (an operator's edit could pack anything; a change number past 2^53 would stop
-- growing, and copies would drop every change after it).
local function whole(x)
  return x >= 0 and x < 9007199254740992 and x == math.floor(x)
end

-- The address counts, made when a sweep or a leave first needs them.
local function counts_of_addrs()
  if not addrs then addrs = {[ip] = ip_n} end
  return addrs
end

-- Every key starts so, then `swarm` and '}:' (redis_store.rs's KEY_PREFIX). Keys are one
-- concatenation each, not a prefix string then a key: that made a string per announce.
local PREFIX = 'fbpkg:v5:{'

local function role_key(r)
  if r == 'S' then return PREFIX .. swarm .. '}:seeders' end
  return PREFIX .. swarm .. '}:leechers'
end

local function meta_key() return PREFIX .. swarm .. '}:meta' end

local function counted(r)
  if r == 'S' then return nS end
  return nL
end

-- The counts as this announce changes the sets (counted from them as it starts).
local function recount(r, d)
  if r == 'S' then nS = math.max(0, nS + d) else nL = math.max(0, nL + d) end
end

local function zone_key(r, p) return PREFIX .. swarm .. '}:z:' .. r .. ':' .. p end

-- A bucket of the wrong type (an operator's doing) cannot hold the member: its error is
-- ignored, so a sweep or a leave is not cut short by it.
local function unzone(m, r, z)
  if z == nil or z == '' then return end
  for _, p in ipairs(prefixes(z)) do redis.pcall('SREM', zone_key(r, p), m) end
end

local function address(m) return string.match(m, '@(.*)$') end

local function put(f, v)
  if not pending then pending = {} end
  pending[f] = v
end

-- `cmd` on the swarm's hash with `args` spread over calls of at most 1000 (Lua's unpack stops
-- at 8000), the replies of all in one table.
local function chunked(cmd, args)
  local out = {}
  for from = 1, #args, 1000 do
    local part = redis.call(cmd, hkey, unpack(args, from, math.min(from + 999, #args)))
    if type(part) == 'table' then
      for _, v in ipairs(part) do out[#out + 1] = v end
    end
  end
  return out
end

-- Write what leaves or changes for other peers (`pending`) now: a sweep's writes must not
-- wait for the end of an announce that may yet fail (a key of the wrong type), or the
-- records of peers taken out of their role's set would stay for ever.
local function flush()
  if not pending then return end
  local set, del = {}, {}
  for f, v in pairs(pending) do
    if v then
      set[#set + 1] = f
      set[#set + 1] = v
    else
      del[#del + 1] = f
    end
  end
  pending = nil
  if #del > 0 then chunked('HDEL', del) end
  if #set > 0 then chunked('HSET', set) end
end

-- Forget a peer entirely (record, buckets, address count, its role's set); the count of its
-- address has been read.
local function forget(m, prev)
  local r, z = parse(prev)
  unzone(m, r, z)
  if redis.call('ZREM', role_key(r), m) == 1 then recount(r, -1) end
  local a = address(m)
  if a then
    local counts = counts_of_addrs()
    local n = (counts[a] or 1) - 1
    counts[a] = n
    put('a:' .. a, n > 0 and n or false)
  end
  put('p:' .. m, false)
end

-- Expire the silent peers of role `r`; returns whether a full batch was taken (the next
-- announce takes the rest), and whether `member` was among them. Written at once (`flush`):
-- a peer in both sets (a state only a failure leaves) is not forgotten twice.
local function sweep_role(r, cutoff, member)
  local k = role_key(r)
  local stale = redis.call('ZRANGEBYSCORE', k, '-inf', '(' .. cutoff, 'LIMIT', 0, batch)
  if #stale == 0 then return false, false end
  -- Their records and the counts of their addresses not read yet, in one HMGET.
  local fields, wanted, counts = {}, {}, counts_of_addrs()
  for i, m in ipairs(stale) do fields[i] = 'p:' .. m end
  for _, m in ipairs(stale) do
    local a = address(m)
    if a and counts[a] == nil and not wanted[a] then
      wanted[a] = true
      fields[#fields + 1] = 'a:' .. a
    end
  end
  local got = chunked('HMGET', fields)
  for i = #stale + 1, #fields do counts[string.sub(fields[i], 3)] = tonumber(got[i] or '0') end
  local gone = false
  for i, m in ipairs(stale) do
    if m == member then gone = true end
    if got[i] then
      forget(m, got[i])
    elseif redis.call('ZREM', k, m) == 1 then
      recount(r, -1)
    end
  end
  flush()
  return #stale == batch, gone
end

-- Write back what the announce changed: first what leaves or changes for other peers
-- (`pending`, see `flush`), then in one HSET the state and `...` (the announcer's own
-- fields). Chores then refresh the keys' TTLs (after the writes: a key made by them gets its
-- TTL too).
local function save(chores, ...)
  flush()
  if chores then touched = now end
  redis.call('HSET', hkey, 'st', state(), ...)
  if chores then
    redis.call('PEXPIRE', role_key('S'), keep_s)
    redis.call('PEXPIRE', role_key('L'), keep_s)
    redis.call('PEXPIRE', hkey, keep_s)
    redis.call('PEXPIRE', meta_key(), meta_ttl)
  end
end

local function announce(hash, member, at_ip, event, role, zone, rec, at, numwant, answer)
  now_s, now = at, tonumber(at)
  swarm = hash
  hkey = PREFIX .. hash .. '}:swarm'
  pending, addrs, ip = nil, nil, at_ip
  local own, af = 'p:' .. member, 'a:' .. ip

  local got = redis.call('HMGET', hkey, 'st', own, af)
  local st = got[1]
  -- A swarm without its state (new, its hash expired, or a state this script cannot read: an
  -- operator's edit) does its chores, sweeps, and numbers its changes on from now (ms): above
  -- any number a copy of it holds, as numbers grow by one a change, far fewer than one a
  -- millisecond over a swarm's life, so no copy takes the new changes for ones it has
  -- (mirror.rs).
  local readable = false
  if st and #st == STATE_LEN and string.byte(st, 1) == 35 and string.byte(st, 2) == 35 then
    local _
    _, _, touched, swept, seq, oldest = struct.unpack(STATE, st)
    readable = whole(touched) and whole(swept) and whole(seq) and whole(oldest)
  end
  local chores = not readable
  if not readable then touched, swept, seq, oldest = 0, 0, now, 0 end
  local old = got[2]
  ip_n = tonumber(got[3] or '0')
  if now - touched >= every or now < touched then chores = true end
  -- The role counts are the sets' own: replicas add peers to them without this script.
  nS, nL = redis.call('ZCARD', role_key('S')), redis.call('ZCARD', role_key('L'))
  if nS + nL == 0 then chores = true end
  -- Leaving a swarm one is not in changes nothing (and makes no key).
  if event == 'stopped' and not old then return {1, nS, nL, 0, oldest} end

  -- A swarm without a bound (new, or its hash expired: `oldest` is 0) sweeps, and learns it.
  local cutoff = now - ttl
  local sweep = (now - swept >= sweep_every or now < swept) and oldest < cutoff
  if sweep then
    local full_s, gone_s = sweep_role('S', cutoff, member)
    local full_l, gone_l = sweep_role('L', cutoff, member)
    -- Its own entry may have gone with the sweep (silent past its TTL): it is new again.
    if gone_s or gone_l then old = false end
    -- The oldest score left (stale still after a full batch: the next announce sweeps
    -- again, as it does when `swept` is not moved).
    oldest = now
    for _, r in ipairs({'S', 'L'}) do
      local first = redis.call('ZRANGE', role_key(r), 0, 0, 'WITHSCORES')
      if first[2] then oldest = math.min(oldest, tonumber(first[2])) end
    end
    if full_s or full_l then sweep = false end
  end
  if sweep then swept = now end
  -- This announce's score is `now`: a replica whose clock is behind lowers the bound, and
  -- writes it before the score (an error between the two must not leave it too high).
  if now < oldest then
    oldest = now
    redis.call('HSET', hkey, 'st', state())
  end

  if event == 'stopped' then
    if not old then
      save(chores)
      return {1, nS, nL, 0, oldest}
    end
    forget(member, old)
    seq = seq + 1
    save(chores)
  else
    local joined = nil
    if not old then
      -- Limits apply to a peer that joins.
      joined = (addrs and addrs[ip] or ip_n) + 1
      local refused = nil
      if joined > max_per_addr then
        refused = 3
      elseif nS + nL >= max_peers then
        refused = 2
      end
      if refused then
        save(chores)
        return {refused}
      end
    end
    local was, old_zone = nil, nil
    if old then was, old_zone = parse(old) end
    -- Once per download: a seeder already here repeating 'completed' is not another.
    if (role == 'S' and event == 'completed' and not old) or (was == 'L' and role == 'S') then
      redis.call('HINCRBY', meta_key(), 'completed', '1')
      chores = true
    end
    if old and (was ~= role or old_zone ~= zone) then
      unzone(member, was, old_zone)
      if was ~= role and redis.call('ZREM', role_key(was), member) == 1 then recount(was, -1) end
    end
    local first = counted(role) == 0
    local k = role_key(role)
    if redis.call('ZADD', k, now_s, member) == 1 then
      recount(role, 1)
      if first then redis.call('PEXPIRE', k, keep_s) end
    end
    if zone ~= '' then
      for _, p in ipairs(prefixes(zone)) do
        local zk = zone_key(role, p)
        redis.call('SADD', zk, member)
        redis.call('PEXPIRE', zk, keep_s)
      end
    end
    seq = seq + 1
    if joined then
      save(chores, own, rec, af, string.format('%d', joined))
    else
      save(chores, own, rec)
    end
  end

  if channel ~= '' then
    local op = 'U'
    if event == 'stopped' then op = 'D' end
    changes[#changes + 1] =
      string.format('%s|%s|%d|%s|%s|%s', publisher, hash, seq, op, now_s, rec)
  end
  if event == 'stopped' then return {1, nS, nL, seq, oldest} end

  local out = {0, nS, nL, seq, oldest}
  if answer == 'all' then
    -- Silent peers past the cutoff that the sweep has not reached yet are left out.
    local at, fields = {}, {}
    for _, r in ipairs({'S', 'L'}) do
      local live = redis.call('ZRANGE', role_key(r), cutoff, '+inf', 'BYSCORE', 'WITHSCORES')
      for i = 1, #live, 2 do
        fields[#fields + 1] = 'p:' .. live[i]
        at[#at + 1] = live[i + 1]
      end
    end
    if #fields == 0 then return out end
    local recs = chunked('HMGET', fields)
    for i = 1, #fields do
      if recs[i] then
        out[#out + 1] = at[i]
        out[#out + 1] = recs[i]
      end
    end
    return out
  end
  if answer ~= 'draw' or numwant <= 0 then return out end
  -- The answer: see sample.rs for the policy. When everyone the asker may get fits in numwant
  -- (its own entry aside; a seeder gets leechers only), the answer is all of them, in any order,
  -- read with one HVALS instead of a draw per level and role. The hash's values are records
  -- ('S|...' or 'L|...'), address counts (digits) and the state ('##...', see `state`): the
  -- second byte tells them apart, and reading values alone allocates half what HGETALL's
  -- fields and values would.
  local others = nL
  if role == 'L' then others = nS + nL - 1 end
  if others <= numwant and role == 'S' then
    -- A seeder gets leechers only: read just theirs. The hash holds every seeder too, and a
    -- deployed package's swarm is thousands of seeders and a few leechers, each seeder
    -- announcing: reading it whole made each announce cost the whole swarm.
    local ls = redis.call('ZRANGE', role_key('L'), 0, -1)
    if #ls == 0 then return out end
    local fields = {}
    for i = 1, #ls do fields[i] = 'p:' .. ls[i] end
    for _, r in ipairs(chunked('HMGET', fields)) do
      if #out - 5 >= numwant then break end
      if r then out[#out + 1] = r end
    end
    return out
  end
  if others <= numwant then
    for _, r in ipairs(redis.call('HVALS', hkey)) do
      if #out - 5 >= numwant then break end
      if string.byte(r, 2) == 124 and r ~= rec and (role == 'L' or string.byte(r, 1) == 76) then
        out[#out + 1] = r
      end
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
          picked[#picked + 1] = 'p:' .. m
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
    local recs = chunked('HMGET', picked)
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
    ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], tonumber(ARGV[a + 9]),
    ARGV[a + 10])
  if ok then
    out[#out + 1] = r
  elseif type(r) == 'table' and r.err then
    out[#out + 1] = {-1, r.err}
  else
    out[#out + 1] = {-1, tostring(r)}
  end
end
if #changes > 0 then redis.call('PUBLISH', channel, table.concat(changes, '\n')) end
return out
