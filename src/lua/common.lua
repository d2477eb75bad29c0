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
--   KEYS[10] snapshot HASH   latest snapshot request and threshold arming             (public)
--   KEYS[11] outbox   LIST   snapshot requests not yet flushed to the snapshot stream (internal)
--   KEYS[12] outboxes SET    documents whose outbox is not empty (global)
-- ARGV[1] history_ms, ARGV[2] ttl_ms (0: sessions never expire), ARGV[3] document id,
-- ARGV[4] options, a MessagePack map: t (snapshot thresholds, ascending), h (hysteresis),
--   c (cooldown ms, 0: none), e (1: a request when the document empties), u (most users listed in
--   a request), p (1: publish membership changes), ch (the change feed channel).
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
local opts = cmsgpack.unpack(ARGV[4])
-- The event that changed membership last (set by the calling script), and why users leave.
local cause_event, cause_entry, left_reason = '', '', 'leave'
local present = before

-- Publishes one membership change on the document's sharded channel.
local function feed(user, change)
  if opts.p ~= 1 then return end
  local msg = {v = 1, doc = doc, user = user, change = change, count = present, at = now}
  if change == 'left' then msg.reason = left_reason end
  redis.call('SPUBLISH', opts.ch, cmsgpack.pack(msg))
end

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
      present = present + 1
      feed(user, 'joined')
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
      present = present - 1
      feed(user, 'left')
    end
    redis.call('HINCRBY', KEYS[8], 'live_sessions', -1)
    if ttl > 0 then redis.call('ZREM', KEYS[6], field) end
  end
  redis.call('ZADD', KEYS[5], now, field)
end

-- Decides on a snapshot request for the count this step produced, and queues it in the outbox.
-- Each threshold is armed until a request names it or a higher one; it re-arms when the count
-- falls below threshold - hysteresis. Returns the reason of the request, or ''.
local function snapshot(after)
  local thresholds = opts.t
  if #thresholds == 0 and opts.e ~= 1 then return '' end
  local st = redis.call('HMGET', KEYS[10], 'disarmed', 'last_at')
  local disarmed = {}
  for v in string.gmatch(st[1] or '', '%d+') do disarmed[tonumber(v)] = true end
  for th in pairs(disarmed) do
    if after < th - opts.h then disarmed[th] = nil end
  end
  local reason, threshold = nil, 0
  if opts.e == 1 and before > 0 and after == 0 then reason = 'empty' end
  local highest = nil
  for _, th in ipairs(thresholds) do
    if after >= th and not disarmed[th] then highest = th end
  end
  local last_at = tonumber(st[2])
  if highest and not reason and (opts.c == 0 or last_at == nil or now - last_at >= opts.c) then
    reason, threshold = 'threshold', highest
    for _, th in ipairs(thresholds) do
      if th <= after then disarmed[th] = true end
    end
  end
  local list = {}
  for th in pairs(disarmed) do list[#list + 1] = th end
  table.sort(list)
  local armed = table.concat(list, ',')
  if armed ~= (st[1] or '') then redis.call('HSET', KEYS[10], 'disarmed', armed) end
  if not reason then return '' end
  local users = redis.call('SMEMBERS', KEYS[1])
  table.sort(users)
  while #users > opts.u do table.remove(users) end
  local n = redis.call('HINCRBY', KEYS[10], 'emitted', 1)
  local id = redis.sha1hex(doc .. '\31' .. n .. '\31' .. now)
  local request = cmsgpack.pack({
    v = 1, snapshot_id = id, doc = doc, reason = reason, threshold = threshold, count = after,
    users = users, cause = {event_id = cause_event, entry_id = cause_entry}, at = now,
  })
  redis.call('RPUSH', KEYS[11], request)
  redis.call('SADD', KEYS[12], doc)
  redis.call('HSET', KEYS[10], 'snapshot_id', id, 'reason', reason, 'threshold', threshold,
    'count', after, 'at', now, 'cause_event_id', cause_event, 'cause_entry_id', cause_entry,
    'request', request)
  if reason == 'threshold' then redis.call('HSET', KEYS[10], 'last_at', now) end
  return reason
end

-- After the changes: the count, the lifetime of the history, the document's expiry due time and
-- its snapshot request. Returns the snapshot reason ('' for none).
local function finish()
  local after = redis.call('SCARD', KEYS[1])
  if after == 0 then
    -- Nobody is here: only ordering history remains, and it goes once it is old enough.
    redis.call('DEL', KEYS[2])
    if before ~= 0 then redis.call('ZREM', KEYS[9], doc) end
    redis.call('PEXPIRE', KEYS[3], history)
    redis.call('PEXPIRE', KEYS[5], history)
    redis.call('PEXPIRE', KEYS[10], history)
  else
    if after ~= before then
      redis.call('SET', KEYS[2], after)
      redis.call('ZADD', KEYS[9], after, doc)
    end
    if before == 0 then
      redis.call('PERSIST', KEYS[3])
      redis.call('PERSIST', KEYS[5])
      redis.call('PERSIST', KEYS[10])
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
  return snapshot(after)
end
