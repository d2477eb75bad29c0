-- common.lua: shared by apply.lua and expire.lua (prepended to each), so both change a document's
-- membership the same way.
--
-- KEYS of every document script:
--   KEYS[1] users     SET    users present in the document                     (public)
--   KEYS[2] count     STRING SCARD of users, absent when 0                      (public)
--   KEYS[3] sessions  HASH   "<user>\31<session>" -> session record             (internal)
--   KEYS[4] live      HASH   user -> number of live sessions                    (internal)
--   KEYS[5] ended     ZSET   "<user>\31<session>" -> server ms it ended         (internal)
--   KEYS[6] alive     ZSET   "<user>\31<session>" -> server ms of last refresh  (internal, expiry)
--   KEYS[7] expiry    ZSET   document -> server ms its first session is due to expire (global)
--   KEYS[8] stats     HASH   live_sessions, present_users over all documents (global)
--   KEYS[9] top       ZSET   document -> number of users present, for `top` (global)
-- ARGV[1] history_ms, ARGV[2] ttl_ms (0: sessions never expire), ARGV[3] document id.
--
-- A session record is a MessagePack map: l (1 live, 0 ended), q (seq of the deciding event as a
-- decimal string, absent when none), m/s (its stream id ms/seq parts, decimal strings), i (its
-- event id), t (server ms it was applied, or ended), x (1 when ended by expiry), and for meta
-- mq/mm/ms (version of the event that last wrote meta) and d (meta, MessagePack bytes).

local history = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local doc = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local before = redis.call('SCARD', KEYS[1])

-- Decimal strings without leading zeros compare by length, then lexically: exact for any u64.
local function gt(a, b)
  local la, lb = #a, #b
  if la ~= lb then return la > lb end
  return a > b
end

-- Is version 1 newer than version 2? With a seq on both, the higher seq wins and, for equal seq,
-- the earlier stream entry; otherwise the later stream entry wins. (Rust: coalesce::Version.)
local function newer(q1, m1, s1, q2, m2, s2)
  if q1 ~= '' and q2 ~= nil then
    if q1 ~= q2 then return gt(q1, q2) end
    if m1 ~= m2 then return gt(m2, m1) end
    return gt(s2, s1)
  end
  if m1 ~= m2 then return gt(m1, m2) end
  return gt(s1, s2)
end

-- A session became live (or was refreshed while live).
local function session_live(field, user, was_live)
  if not was_live then
    if redis.call('HINCRBY', KEYS[4], user, 1) == 1 then
      redis.call('SADD', KEYS[1], user)
      redis.call('HINCRBY', KEYS[8], 'present_users', 1)
    end
    redis.call('ZREM', KEYS[5], field)
    redis.call('HINCRBY', KEYS[8], 'live_sessions', 1)
  end
  if ttl > 0 then redis.call('ZADD', KEYS[6], now, field) end
end

-- A session ended (leave or expiry); it stays as ordering history.
local function session_ended(field, user, was_live)
  if was_live then
    if redis.call('HINCRBY', KEYS[4], user, -1) <= 0 then
      redis.call('HDEL', KEYS[4], user)
      redis.call('SREM', KEYS[1], user)
      redis.call('HINCRBY', KEYS[8], 'present_users', -1)
    end
    redis.call('HINCRBY', KEYS[8], 'live_sessions', -1)
    if ttl > 0 then redis.call('ZREM', KEYS[6], field) end
  end
  redis.call('ZADD', KEYS[5], now, field)
end

-- After the changes: the count, the lifetime of the history, and the document's expiry due time.
local function finish()
  local after = redis.call('SCARD', KEYS[1])
  if after == 0 then
    -- Nobody is here: only ordering history remains, and it goes once it is old enough.
    redis.call('DEL', KEYS[2])
    if before ~= 0 then redis.call('ZREM', KEYS[9], doc) end
    redis.call('PEXPIRE', KEYS[3], history)
    redis.call('PEXPIRE', KEYS[5], history)
  else
    if after ~= before then
      redis.call('SET', KEYS[2], after)
      redis.call('ZADD', KEYS[9], after, doc)
    end
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
  if ttl > 0 then
    local first = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
    if first[2] then
      redis.call('ZADD', KEYS[7], tonumber(first[2]) + ttl, doc)
    else
      redis.call('ZREM', KEYS[7], doc)
    end
  end
  return after
end
