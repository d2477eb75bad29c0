-- common.lua: shared by apply.lua, expire.lua and repair.lua (prepended to each), so every script
-- changes a document's membership the same way.
--
-- KEYS of every document script: four global keys, then one per document (i = 0, 1, ...), its
-- records hash. The document's other keys are named in the script, and only when a step touches
-- them: dkey(suffix) is ARGV[3]'s cp ("<prefix>:doc:{"), the document id, "}:" and the suffix,
-- as for the records hash (users_key() is dkey('users'), named once per step).
--   KEYS[1]          expiry    ZSET   document -> server ms it is due for a visit (global)
--   KEYS[2]          stats     HASH   live_sessions, present_users over all documents (global)
--   KEYS[3]          top       ZSET   document -> users present, for `top` (global)
--   KEYS[4]          outboxes  SET    documents whose snapshot outbox is not empty (global)
--   KEYS[4+i+1]      records   HASH   user -> the user's session records (see below)     (internal)
--   users_key()      users     SET    users present in the document                     (public)
--   dkey('count')    count     STRING SCARD of users, absent when 0                      (public)
--   dkey('snapshot') snapshot  HASH   latest snapshot request and threshold arming      (public)
--   dkey('outbox')   outbox    LIST   snapshot requests not yet in the snapshot stream  (internal)
-- and of earlier versions, which migrate() folds into the records hash and deletes:
--   dkey('sessions') sessions  HASH   "<user>\31<session>" -> session record
--   dkey('live')     live      HASH   user -> number of live sessions
--   dkey('ended')    ended     ZSET   "<user>\31<session>" -> server ms it ended
--   dkey('alive')    alive     ZSET   "<user>\31<session>" -> ms of last refresh
-- (One declared key per document, not several: creating eight key names as Lua strings for
-- every document of every call was 8% of Redis's work, and most steps touch only the records
-- hash. The keys named in the script share the declared key's hash slot, which is what Redis
-- Cluster checks.)
--
-- A user's value in the records hash holds the records of all their sessions in the document,
-- one entry after the other: the session id's length (u16), the record's length (u16), the
-- session id, the record. One field per user, not one per session, and no separate per-user
-- count of live sessions: whether a user has another live session is read from their entries.
-- ARGV[1] history_ms, ARGV[2] ttl_ms (0: sessions never expire),
-- ARGV[3] options, a MessagePack map: t (snapshot thresholds, ascending), h (hysteresis),
--   c (cooldown ms, 0: none), e (1: a request when a document empties), u (most users listed in
--   a request), p (1: publish membership changes), cp (change feed channel prefix: the channel is
--   cp .. doc .. "}:presence").
--
-- A session record is a binary string (struct.pack, big-endian; a u64 as two u32 halves, hi then
-- lo, so that versions compare exactly, never as rounded Lua numbers):
--   0xC1 (a marker: the byte MessagePack never uses)
--   flags (u8): 1 live, 2 has a seq, 4 ended by expiry, 8 has a meta version, 16 the meta version
--     has a seq, 32 the stream id sequence of the version needs 64 bits (else 32), 64 the same
--     for the meta version
--   time (u48: u16 hi, u32 lo): Redis server ms of the session's last refresh while live, or of
--     its end
--   the deciding event's version: seq (u64, only with flag 2), stream id ms (u64) and sequence
--     (u32, or u64 with flag 32)
--   a 32-bit hash of its event id (u32)
--   with flag 8, the version of the event that wrote meta last, the same way (flags 16 and 64)
--   to the end: the meta map (MessagePack bytes); nothing when none (never set, or cleared by a
--     leave)
-- 24 bytes for a session without seq nor meta. The earlier versions' sessions hash holds
-- records of this layout and of two earlier ones: the same without the marker and the time (the
-- first byte is the flags, below 0x80; the time is then the score in `alive` or `ended`), and a
-- MessagePack map (first byte 0x80 to 0x8f: l, m/s, q, i, x, mm/ms/mq, d), which load_record()
-- reads as the same record. migrate() rewrites them all in this layout, with their times.
--
-- The records' times are the only per-session index: a refresh rewrites just the record. A
-- document is due for a visit (expire.lua) when its earliest live session may be silent for ttl,
-- or an eighth of the history after its earliest ended session is older than the history; the
-- visit reads every record, expires and prunes, and sets the exact next due time. Between visits
-- the due time may be early, never late.

-- The library functions of the hot path, as locals (a global is a table lookup per use).
local spack, sunpack, rcall, ssub, sbyte, sfind = struct.pack, struct.unpack, redis.call,
  string.sub, string.byte, string.find

local history = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local opts = cmsgpack.unpack(ARGV[3])
local t = rcall('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Numbers passed to redis.call are formatted there with snprintf('%.17g') on every call: the
-- ones used per session or per document are formatted once, as integers.
-- A document with ended sessions is due for pruning them an eighth of the history after the
-- oldest is old enough, so that one visit prunes many.
local prune_slack = math.floor(history / 8)
local prune_due_arg = string.format('%d', now + history + prune_slack)
local history_arg = ARGV[1]
local due_arg = string.format('%d', now + ttl)

-- The changes to the totals and the global indexes, written once per call by flush_globals():
-- to the live sessions and present users, and per document its new count in `top` (false:
-- remove it) and its new due time (due_mode: 'nx' only if it has none, 'set', or 'del').
local d_sessions, d_users = 0, 0
local top_of, due_at, due_mode = {}, {}, {}

-- The document being changed (set by begin_doc), its count before, and now (SCARD of its users,
-- followed through SADD and SREM; both nil until load_count() reads them: a step that changes no
-- membership never needs them).
local K, doc, before, present = 0, '', nil, nil
-- The name of the document's users key, once used in this step (users_key).
local k_users = nil
local ended_touched, went_live = false, false
-- The event that changed membership last (set by the calling script), and why users leave.
-- cause_text: when set, the event id and entry id are read from it only if a snapshot request
-- needs them: cause_id_len bytes at cause_at, then cause_entry_len bytes.
local cause_event, cause_entry, left_reason = '', '', 'leave'
local cause_text, cause_at, cause_id_len, cause_entry_len = nil, 0, 0, 0
-- Whether the expiry due time must be exact (expire, repair: they set exact_next, the exact due
-- time or false for none) or may be early (apply).
local exact_due, exact_next = false, false

local function begin_doc(i, id)
  K, doc = 5 + i, id
  k_users = nil
  before, present = nil, nil
  ended_touched, went_live = false, false
  cause_event, cause_entry, cause_text = '', '', nil
end

-- The name of the document's key with suffix `name` (see above).
local doc_prefix = opts.cp
local function dkey(name)
  return doc_prefix .. doc .. '}:' .. name
end

-- The document's users key, named once per step: most steps that use it use it several times.
local function users_key()
  if not k_users then k_users = dkey('users') end
  return k_users
end

-- Calls `cmd` on `key` with the arguments in `list`, a few thousand at a time (unpack's limit),
-- groups of `per` kept together; returns the replies' elements in one table (a command that
-- replies with an array).
local function in_chunks(cmd, key, list, per)
  local step = 4000 - 4000 % per
  if #list <= step then return rcall(cmd, key, unpack(list)) end
  local out = {}
  for i = 1, #list, step do
    local reply = rcall(cmd, key, unpack(list, i, math.min(i + step - 1, #list)))
    if type(reply) == 'table' then
      for _, v in ipairs(reply) do out[#out + 1] = v end
    end
  end
  return out
end

-- Reads the document's count before this step, once.
local function load_count()
  if present == nil then
    before = rcall('SCARD', users_key())
    present = before
  end
end

local TWO32 = 4294967296

-- The record's head (see above): the marker, flags and time.
local HEAD, HEAD_LEN = '>BBI2I4', 8
local MARKER = 193

-- A u64 held exactly in a double (below 2^53), as its hi and lo halves (also a time in ms, as
-- the record holds it).
local function halves(x)
  local lo = x % TWO32
  return (x - lo) / TWO32, lo
end

local now_hi, now_lo = halves(now)

-- A u64 written in decimal, as its hi and lo halves (exact for any u64).
local function decimal_halves(q)
  local hi, lo = 0, 0
  for i = 1, #q do
    lo = lo * 10 + string.byte(q, i) - 48
    local carry = math.floor(lo / TWO32)
    hi, lo = hi * 10 + carry, lo - carry * TWO32
  end
  return hi, lo
end

-- A version as a session record holds it (see above): seq only when q, the stream id sequence
-- in 32 bits when its hi half is 0.
local function pack_version(q, qh, ql, mh, ml, sh, sl)
  if sh == 0 then
    if q then return spack('>I4I4I4I4I4', qh, ql, mh, ml, sl) end
    return spack('>I4I4I4', mh, ml, sl)
  end
  if q then return spack('>I4I4I4I4I4I4', qh, ql, mh, ml, sh, sl) end
  return spack('>I4I4I4I4', mh, ml, sh, sl)
end

-- The version pack_version() wrote at `pos` of `s` (q: with a seq; wide: a 64-bit stream id
-- sequence): its halves, then the position after it.
local function unpack_version(s, pos, q, wide)
  local qh, ql, mh, ml, sh, sl = 0, 0, 0, 0, 0, 0
  if q then qh, ql, pos = sunpack('>I4I4', s, pos) end
  if wide then
    mh, ml, sh, sl, pos = sunpack('>I4I4I4I4', s, pos)
  else
    mh, ml, sl, pos = sunpack('>I4I4I4', s, pos)
  end
  return qh, ql, mh, ml, sh, sl, pos
end

-- A record of the earlier MessagePack layout, in the current one.
local function upgrade(raw)
  local r = cmsgpack.unpack(raw)
  local qh, ql = 0, 0
  if r.q then qh, ql = decimal_halves(r.q) end
  local mh, ml = halves(r.m or 0)
  local sh, sl = halves(r.s or 0)
  local flags = (r.l == 1 and 1 or 0) + (r.q and 2 or 0) + (r.x == 1 and 4 or 0)
    + (sh > 0 and 32 or 0)
  local out = pack_version(r.q ~= nil, qh, ql, mh, ml, sh, sl) .. spack('>I4', r.i or 0)
  if r.mm then
    local mqh, mql = 0, 0
    if r.mq then mqh, mql = decimal_halves(r.mq) end
    local mmh, mml = halves(r.mm)
    local msh, msl = halves(r.ms or 0)
    flags = flags + 8 + (r.mq and 16 or 0) + (msh > 0 and 64 or 0)
    out = out .. pack_version(r.mq ~= nil, mqh, mql, mmh, mml, msh, msl) .. (r.d or '')
  end
  return string.char(flags) .. out
end

-- A stored session record (HGET's reply: false when there is none) in the current layout: the
-- record, its flags (0 when there is none), and its time (nil for a record of an earlier layout,
-- which has none: its head then holds 0 in its place).
local function load_record(raw)
  if not raw then return false, 0, nil end
  local first = sbyte(raw) or 0
  if first == MARKER then
    local _, flags, th, tl = sunpack(HEAD, raw)
    return raw, flags, th * TWO32 + tl
  end
  if first >= 128 then
    raw = upgrade(raw)
    first = sbyte(raw)
  end
  return spack(HEAD, MARKER, first, 0, 0) .. ssub(raw, 2), first, nil
end

-- `raw` (a record in the current layout) with flags `flags` and time `th`, `tl` in its head.
local function with_head(raw, flags, th, tl)
  return spack(HEAD, MARKER, flags, th, tl) .. ssub(raw, HEAD_LEN + 1)
end

-- The user and session of a field of an earlier version's sessions hash ("<user>\31<session>"),
-- or nil for a field that is none.
local function split_field(field)
  local sep = sfind(field, '\31', 1, true)
  if not sep or sep == 1 or sep == #field then return nil end
  return ssub(field, 1, sep - 1), ssub(field, sep + 1)
end

-- The time of a record of an earlier layout: its score in the `alive` (live) or `ended` index,
-- or now when it has none.
local function indexed_time(field, live)
  local score = rcall('ZSCORE', dkey(live and 'alive' or 'ended'), field)
  return tonumber(score) or now
end

-- A user's entries in the records hash (see above), walked with
--   for e, pos, rs in entry_after, rec, 0 do ... end
-- entry_after(rec, e) is the entry after the one ending at `e` (0: the first): where it ends,
-- where it begins and where its record begins (its session id is from pos + 4 to rs - 1); nil
-- after the last.
local function entry_after(rec, e)
  local pos = e + 1
  if pos >= #rec then return nil end
  local a, b, c, d = sbyte(rec, pos, pos + 3)
  local rs = pos + 4 + a * 256 + b
  return rs + c * 256 + d - 1, pos, rs
end

-- The entry of session `sid` in `rec` (false or nil: none): where it begins, where its record
-- begins and ends; nil when there is none.
local function find_entry(rec, sid)
  if not rec then return nil end
  -- Where the id occurs (a plain find: no substring made per entry), checked against the
  -- entries' starts; an occurrence that is no entry's id (inside a record, or the start of a
  -- longer id) makes the search go on from the next entry.
  local at = sfind(rec, sid, 5, true)
  if not at then return nil end
  local sl, n, pos = #sid, #rec, 1
  while pos < n do
    local a, b, c, d = sbyte(rec, pos, pos + 3)
    local rs = pos + 4 + a * 256 + b
    local e = rs + c * 256 + d - 1
    if at < pos + 4 then
      at = sfind(rec, sid, pos + 4, true)
      if not at then return nil end
    end
    if at == pos + 4 and rs - pos - 4 == sl then return pos, rs, e end
    pos = e + 1
  end
  return nil
end

-- `rec` (false: none) with the entry of session `sid` set to `record`: the entry at `pos` (up to
-- `e`) replaced, or a new one appended when pos is nil.
local ENTRY = '>I2I2'
local function put_entry(rec, pos, e, sid, record)
  if #record > 65535 then error('a session record longer than 65535 bytes', 0) end
  if not pos then return (rec or '') .. spack(ENTRY, #sid, #record) .. sid .. record end
  return ssub(rec, 1, pos - 1) .. spack(ENTRY, #sid, #record) .. sid .. record .. ssub(rec, e + 1)
end

-- The flags and time of the record at `rs` of `rec` (see above).
local function flags_at(rec, rs)
  local _, flags, th, tl = sunpack(HEAD, rec, rs)
  return flags, th * TWO32 + tl
end

-- Whether `rec` holds a live session other than the entry at `skip` (nil: any).
local function live_others(rec, skip)
  if not rec then return false end
  for _, pos, rs in entry_after, rec, 0 do
    if pos ~= skip and sbyte(rec, rs + 1) % 2 == 1 then return true end
  end
  return false
end

-- Moves the document from the earlier versions' keys (see above) into its records hash, in the
-- current record layout with each record's time, and deletes them; does nothing when it has no
-- sessions hash. Returns whether it moved anything. (A worker of this version never writes those
-- keys: once moved, a document stays moved.)
local function migrate()
  local old = dkey('sessions')
  if rcall('EXISTS', old) == 0 then return false end
  local all = rcall('HGETALL', old)
  local recs, users = {}, {}
  local existed = rcall('EXISTS', KEYS[K]) == 1
  for i = 1, #all, 2 do
    local field = all[i]
    local user, sid = split_field(field)
    if user then
      local raw, flags, at = load_record(all[i + 1])
      if not at then raw = with_head(raw, flags, halves(indexed_time(field, flags % 2 == 1))) end
      if not recs[user] then
        users[#users + 1] = user
        recs[user] = existed and rcall('HGET', KEYS[K], user) or false
      end
      -- (A session already in the records hash keeps its record there: it is the later.)
      if not find_entry(recs[user], sid) then
        recs[user] = put_entry(recs[user], nil, nil, sid, raw)
      end
    end
  end
  local list = {}
  for _, u in ipairs(users) do list[#list + 1], list[#list + 2] = u, recs[u] end
  if #list > 0 then in_chunks('HSET', KEYS[K], list, 2) end
  local pttl = rcall('PTTL', old)
  if not existed and pttl > 0 then rcall('PEXPIRE', KEYS[K], pttl) end
  rcall('DEL', old, dkey('live'), dkey('alive'), dkey('ended'))
  return true
end

-- Is version 1 newer than version 2? With a seq on both, the higher seq wins and, for equal seq,
-- the earlier stream entry; otherwise the later stream entry wins. (Rust: coalesce::Version.)
-- Each version: whether it has a seq, then seq, stream id ms and stream id sequence as u64
-- halves (hi, lo).
local function newer(q1, qh1, ql1, mh1, ml1, sh1, sl1, q2, qh2, ql2, mh2, ml2, sh2, sl2)
  local later = true
  if q1 and q2 then
    if qh1 ~= qh2 then return qh1 > qh2 end
    if ql1 ~= ql2 then return ql1 > ql2 end
    later = false
  end
  if mh1 ~= mh2 then return (mh1 > mh2) == later end
  if ml1 ~= ml2 then return (ml1 > ml2) == later end
  if sh1 ~= sh2 then return (sh1 > sh2) == later end
  if sl1 ~= sl2 then return (sl1 > sl2) == later end
  return false
end

-- Publishes one membership change on the document's sharded channel.
local function feed(user, change)
  if opts.p ~= 1 then return end
  local msg = {v = 1, doc = doc, user = user, change = change, count = present, at = now}
  if change == 'left' then msg.reason = left_reason end
  rcall('SPUBLISH', opts.cp .. doc .. '}:presence', cmsgpack.pack(msg))
end

-- A session of `user` that was not live became live; `others`: whether the user has another live
-- session in the document. (A refresh of a live session changes only its record, written by the
-- caller.)
local function session_live(user, others)
  -- (The count first: a users key of the wrong type fails the step before anything changed.)
  load_count()
  if not others then
    present = present + rcall('SADD', users_key(), user)
    d_users = d_users + 1
    feed(user, 'joined')
  end
  d_sessions, went_live = d_sessions + 1, true
end

-- A session of `user` ended (leave or expiry); its record stays as ordering history. `others`:
-- whether the user has another live session in the document (read only when was_live).
local function session_ended(user, was_live, others)
  if was_live then
    load_count()
    if not others then
      present = present - rcall('SREM', users_key(), user)
      d_users = d_users - 1
      feed(user, 'left')
    end
    d_sessions = d_sessions - 1
  end
  ended_touched = true
end

-- Decides on a snapshot request for the count this step produced, and queues it in the outbox.
-- Each threshold is armed until a request names it or a higher one; it re-arms when the count
-- falls below threshold - hysteresis. Returns the reason of the request, or ''.
local function snapshot(after)
  local thresholds = opts.t
  if #thresholds == 0 and opts.e ~= 1 then return '' end
  local st = rcall('HMGET', dkey('snapshot'), 'disarmed', 'last_at')
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
  if armed ~= (st[1] or '') then rcall('HSET', dkey('snapshot'), 'disarmed', armed) end
  if not reason then return '' end
  if cause_text then
    local e = cause_at + cause_id_len
    cause_event = ssub(cause_text, cause_at, e - 1)
    cause_entry = ssub(cause_text, e, e + cause_entry_len - 1)
  end
  local users = rcall('SMEMBERS', users_key())
  table.sort(users)
  while #users > opts.u do table.remove(users) end
  local n = rcall('HINCRBY', dkey('snapshot'), 'emitted', 1)
  local id = redis.sha1hex(doc .. '\31' .. n .. '\31' .. now)
  local request = cmsgpack.pack({
    v = 1, snapshot_id = id, doc = doc, reason = reason, threshold = threshold, count = after,
    users = users, cause = {event_id = cause_event, entry_id = cause_entry}, at = now,
  })
  rcall('RPUSH', dkey('outbox'), request)
  rcall('SADD', KEYS[4], doc)
  rcall('HSET', dkey('snapshot'), 'snapshot_id', id, 'reason', reason, 'threshold', threshold,
    'count', after, 'at', now, 'cause_event_id', cause_event, 'cause_entry_id', cause_entry,
    'request', request)
  if reason == 'threshold' then rcall('HSET', dkey('snapshot'), 'last_at', now) end
  return reason
end

-- Writes the changes to the totals and the global indexes, once per call (with_globals).
local function flush_globals()
  if d_sessions ~= 0 then
    rcall('HINCRBY', KEYS[2], 'live_sessions', string.format('%d', d_sessions))
  end
  if d_users ~= 0 then
    rcall('HINCRBY', KEYS[2], 'present_users', string.format('%d', d_users))
  end
  local add, del = {}, {}
  for d, count in pairs(top_of) do
    if count then
      add[#add + 1], add[#add + 2] = count, d
    else
      del[#del + 1] = d
    end
  end
  if #del > 0 then rcall('ZREM', KEYS[3], unpack(del)) end
  if #add > 0 then rcall('ZADD', KEYS[3], unpack(add)) end
  local set, lt = {}, {}
  del = {}
  for d, mode in pairs(due_mode) do
    if mode == 'del' then
      del[#del + 1] = d
    elseif mode == 'lt' then
      lt[#lt + 1], lt[#lt + 2] = due_at[d], d
    else
      set[#set + 1], set[#set + 2] = due_at[d], d
    end
  end
  if #del > 0 then rcall('ZREM', KEYS[1], unpack(del)) end
  if #set > 0 then rcall('ZADD', KEYS[1], unpack(set)) end
  if #lt > 0 then rcall('ZADD', KEYS[1], 'LT', unpack(lt)) end
  d_sessions, d_users, top_of, due_at, due_mode = 0, 0, {}, {}, {}
end

-- Runs body() and then writes the totals and global indexes it changed, also when it fails (a
-- key of the wrong type in a later document): Lua scripts do not roll back, so the documents
-- already changed stay changed and their totals must count them (the retry finds them stale).
-- When body() fails, on_failure() (if any) runs first: it writes what the failed step changed
-- but had not written yet.
-- (xpcall with a handler that keeps the error as it is: Redis's pcall would turn the error of a
-- redis.call into a plain string, and the reply would lose its code, WRONGTYPE becoming ERR.)
local function keep_error(e) return e end

local function with_globals(on_failure, body)
  local ok, err = xpcall(body, keep_error)
  if not ok and on_failure then on_failure() end
  flush_globals()
  if not ok then error(err, 0) end
end

-- The document's due time changes: `mode` 'lt' (`at` unless it has an earlier one), 'set' or
-- 'del' (`at`: a decimal string or a number). Several changes of one document in one call
-- combine as if written in order.
local function due_change(mode, at)
  local prev = due_mode[doc]
  if mode == 'lt' then
    if prev == 'del' then
      mode = 'set'
    elseif prev then
      if tonumber(due_at[doc]) <= tonumber(at) then return end
      mode = prev
    end
  end
  due_mode[doc], due_at[doc] = mode, at
end

-- The exact due time of a document whose earliest live session was refreshed at `first_live`
-- and whose earliest kept ended session ended at `first_ended` (nil: none), or false for none.
local function next_due(first_live, first_ended)
  local due = false
  if first_live and ttl > 0 then due = first_live + ttl end
  if first_ended then
    local prune = math.max(first_ended + history, now + prune_slack)
    if not due or prune < due then due = prune end
  end
  return due
end

-- After a document's changes: its count, the lifetime of its history, its expiry due time and
-- its snapshot request. Returns the snapshot reason ('' for none).
local function finish_doc()
  if present == nil and not ended_touched and not went_live and not exact_due then
    -- No session started or ended (refreshes, stale events): membership, count, history and
    -- expiry are as they were. Only a cooldown can let a threshold fire at an unchanged count.
    if opts.c == 0 or #opts.t == 0 then return '' end
  end
  load_count()
  local after = present
  if after == 0 then
    -- Nobody is here: only ordering history remains, and it goes once it is old enough.
    if before ~= 0 then
      rcall('DEL', dkey('count'))
      top_of[doc] = false
    end
    due_change('del')
    rcall('PEXPIRE', KEYS[K], history_arg)
    rcall('PEXPIRE', dkey('snapshot'), history_arg)
  else
    if after ~= before then
      local count = string.format('%d', after)
      rcall('SET', dkey('count'), count)
      top_of[doc] = count
    end
    if before == 0 then
      rcall('PERSIST', KEYS[K])
      rcall('PERSIST', dkey('snapshot'))
    end
    if exact_due then
      if exact_next then due_change('set', exact_next) else due_change('del') end
    else
      -- The index may be early, never late: a visit (expire.lua) sets the exact time. A new
      -- live session is due at now + ttl at the earliest, an ended one is pruned after the
      -- history.
      if went_live and ttl > 0 then due_change('lt', due_arg) end
      if ended_touched then due_change('lt', prune_due_arg) end
    end
  end
  return snapshot(after)
end
