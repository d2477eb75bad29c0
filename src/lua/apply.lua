-- apply.lua: applies the coalesced events of one document in one atomic step.
--
-- KEYS[1] users     SET   users present in the document            (public)
-- KEYS[2] count     STRING SCARD of users, absent when 0            (public)
-- KEYS[3] sessions  HASH  "<user>\31<session>" -> session record    (internal)
-- KEYS[4] live      HASH  user -> number of live sessions           (internal)
-- KEYS[5] ended     ZSET  "<user>\31<session>" -> ms it ended       (internal, prunes ordering history)
--
-- ARGV[1] history_ms: how long the record of an ended session is kept for ordering
-- ARGV[2] n: number of sessions that follow, 10 arguments each:
--   field, user,
--   live kind ("" none, "1" live, "0" ended), seq ("" none), sid ms, sid seq, event id,
--   meta kind ("" none, "1" set, "0" clear), meta seq, meta sid ms, meta sid seq, meta bytes
--   (that is 12 arguments; see N below)
--
-- A session record is a MessagePack map: l (1 live, 0 ended), q (seq, decimal string, absent when
-- none), m/s (stream id ms/seq of the deciding event), i (its event id), t (server ms it was
-- applied), and for meta: mq/mm/ms (version of the event that last wrote meta), d (meta bytes).
--
-- Returns one outcome per session: 0 applied, 1 stale, 2 duplicate (same event id as the winner).

local N = 12
local history = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Decimal strings without leading zeros compare by length, then lexically: exact for any u64.
local function gt(a, b)
  local la, lb = #a, #b
  if la ~= lb then return la > lb end
  return a > b
end

-- Is version 1 newer than version 2? With a seq on both, the higher seq wins and, for equal seq,
-- the earlier stream entry; otherwise the later stream entry wins.
local function newer(q1, m1, s1, q2, m2, s2)
  if q1 ~= '' and q2 ~= nil then
    if q1 ~= q2 then return gt(q1, q2) end
    if m1 ~= m2 then return gt(m2, m1) end
    return gt(s2, s1)
  end
  if m1 ~= m2 then return gt(m1, m2) end
  return gt(s1, s2)
end

local before = redis.call('SCARD', KEYS[1])
local out = {}
for k = 0, n - 1 do
  local a = 3 + k * N
  local field, user = ARGV[a], ARGV[a + 1]
  local lkind, lseq, lms, lss, lid = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local mkind, mseq, mms, mss, meta = ARGV[a + 7], ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11]
  local raw = redis.call('HGET', KEYS[3], field)
  local r = raw and cmsgpack.unpack(raw) or nil
  local was_live = r ~= nil and r.l == 1
  local dirty = false
  local outcome = 1
  if r == nil then r = {} end
  if lkind ~= '' then
    if r.m == nil or newer(lseq, lms, lss, r.q, r.m, r.s) then
      outcome = (r.i == lid) and 2 or 0
      r.l = tonumber(lkind)
      if lseq ~= '' then r.q = lseq else r.q = nil end
      r.m, r.s, r.i, r.t = lms, lss, lid, now
      dirty = true
    elseif r.i == lid then
      outcome = 2
    end
  end
  if mkind ~= '' and (r.mm == nil or newer(mseq, mms, mss, r.mq, r.mm, r.ms)) then
    if mseq ~= '' then r.mq = mseq else r.mq = nil end
    r.mm, r.ms = mms, mss
    if mkind == '1' then r.d = meta else r.d = nil end
    dirty = true
  end
  out[k + 1] = outcome
  if dirty and r.m ~= nil then
    local is_live = r.l == 1
    if is_live ~= was_live then
      if is_live then
        if redis.call('HINCRBY', KEYS[4], user, 1) == 1 then redis.call('SADD', KEYS[1], user) end
        redis.call('ZREM', KEYS[5], field)
      else
        if redis.call('HINCRBY', KEYS[4], user, -1) <= 0 then
          redis.call('HDEL', KEYS[4], user)
          redis.call('SREM', KEYS[1], user)
        end
      end
    end
    if not is_live then redis.call('ZADD', KEYS[5], now, field) end
    redis.call('HSET', KEYS[3], field, cmsgpack.pack(r))
  end
end

local after = redis.call('SCARD', KEYS[1])
if after == 0 then
  -- Nobody is here: only ordering history remains, and it goes once it is old enough.
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[3], history)
  redis.call('PEXPIRE', KEYS[5], history)
else
  if after ~= before then redis.call('SET', KEYS[2], after) end
  if before == 0 then
    redis.call('PERSIST', KEYS[3])
    redis.call('PERSIST', KEYS[5])
  end
  -- Prune the history of sessions that ended long ago, a few per call.
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - history, 'LIMIT', 0, 64)
  if #old > 0 then
    redis.call('HDEL', KEYS[3], unpack(old))
    redis.call('ZREM', KEYS[5], unpack(old))
  end
end
return out
