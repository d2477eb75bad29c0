-- apply.lua: applies the coalesced events of several documents, each in one atomic step.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- ARGV[4] number of documents; then per document two arguments: its id, and its sessions packed
-- in one string (struct.pack, big-endian; every u64 as two u32 halves, hi then lo): the number
-- of its users (u32, at least 1), the number of its sessions (u32), the users (each once: a u32
-- length, then its bytes), then the sessions one after the other:
--   the user's number (u32, from 1), the session id (a u32 length, then its bytes)
--   flags (u8): 1 live, 2 has a seq, 8 writes meta, 16 that write has a seq, 32 it sets meta
--     (else it clears it)
--   the stream id sequence's high half (u32), seq (u64, 0 without), the stream id ms (u64), the
--     sequence's low half (u32), the event id hash (u32): seq, ms, low half and hash are then in
--     the order of a record's version and hash (see the refresh in apply_doc)
--   event id length (u32), entry id length (u8)
--   with flag 8: the meta write's seq, stream id ms and sequence (u64 each) and, with flag 32,
--     the meta bytes (u32 length, then the bytes)
--   the event id, then the entry id (`<ms>-<seq>`): read only for a snapshot request's cause.
--
-- Returns one string, per document its outcomes, one digit per session ('0' applied, '1' stale,
-- '2' duplicate: the same event as the winner, '3' refused), then the reason of the snapshot
-- request queued (a word, or nothing), then, when make_room ended sessions silent for the TTL,
-- ';' and their number, then ','. (One string: Redis converts every element of an
-- array reply on its own, and 128 of them per call were 3% of its work.)
--
-- A document's users' records are read with one HMGET and written with one HSET (each command a
-- script calls costs Redis about as much again as its own work: the arguments and the reply
-- converted, the command looked up and checked); a document of one user takes HGET and HSET.

local SESSION = '>I4I4c0BI4I4I4I4I4I4I4I4B'
-- The counts of users and sessions and the first user.
local COUNTS = '>I4I4I4c0'
local META_WRITE = '>I4I4I4I4I4I4'
local BYTES = '>I4c0'
-- A session record's head (marker, flags, time), version and event id hash (see common.lua):
-- without seq or with, with a 32-bit stream id sequence or a 64-bit one.
local R, RQ, RW, RQW = '>BBI2I4I4I4I4I4', '>BBI2I4I4I4I4I4I4I4', '>BBI2I4I4I4I4I4I4',
  '>BBI2I4I4I4I4I4I4I4I4'

local OUTCOME = {[0] = '0', [1] = '1', [2] = '2'}
-- The length of a record with flags 1 (see the refresh in apply_doc): head, version, hash.
local PLAIN = HEAD_LEN + 16
-- A record's marker, flags, version and hash (its time skipped): without seq, with one.
local R_VERSION, RQ_VERSION = '>BBxxxxxxI4I4I4I4', '>BBxxxxxxI4I4I4I4I4I4'
-- The head of a live record with flags f refreshed now (marker, flags, time), by flags.
local refreshed_head = {}

local a = 5
local results = {}

-- A document of at least LARGE present users keeps its records hash as a hash table. Redis keeps
-- a hash of up to 512 fields (hash-max-listpack-entries) as a listpack, where every HGET, HMGET
-- field and HSET field is a linear scan: in documents of a few hundred sessions those scans were
-- a sixth of Redis's work. A hash converts to a hash table when a value longer than
-- hash-max-listpack-value (64) is written, and never back while it lives: widen() writes such a
-- value under a field no user can be (ids contain no control characters), then deletes it, in
-- the same atomic step. (A restart loads a small hash as a listpack again:
-- the document's next session to go live converts it again.)
local LARGE = 64
local PAD_FIELD, PAD = '\31', string.rep('.', 1024)
local function widen(key)
  if rcall('OBJECT', 'ENCODING', key) ~= 'listpack' then return end
  rcall('HSET', key, PAD_FIELD, PAD)
  rcall('HDEL', key, PAD_FIELD)
end

-- The document's users (users[u], each once), their records hash values (recs[u]: false for
-- none) and which of them changed (touched[u]; nu users). A step writes the changed ones with one
-- HSET after its sessions, and also when a later session fails the step (write_records runs then
-- too: a session whose membership changed must have its record, or the retry would change it
-- again).
local users, recs, touched, nu = nil, nil, nil, 0
-- (The tables of a document of one user, the most common, reused from one to the next.)
local one_user, one_rec, one_touched = {}, {}, {}
local function write_records()
  if not touched then return end
  if nu == 1 then
    if touched[1] then rcall('HSET', KEYS[K], users[1], recs[1]) end
  else
    local list = {}
    for u = 1, nu do
      if touched[u] then list[#list + 1], list[#list + 2] = users[u], recs[u] end
    end
    if #list > 0 then in_chunks('HSET', KEYS[K], list, 2) end
  end
  touched = nil
end

-- Sessions of the document ended by make_room (expired to make room for a new one).
local doc_expired = 0

-- Most entries one user keeps in the document (--max-user-sessions): their live sessions and the
-- ended ones kept for ordering. Every event of a user walks and rewrites all of their entries, so
-- this bounds its cost.
local max_entries = tonumber(opts.s) or 64

-- Makes room for one more entry in user u's value: while it holds max_entries or more, the
-- user's earliest ended entry is dropped (its ordering history goes before --history is over).
-- When all are live, the one silent longest, if silent for ttl, ends here as the document's next
-- visit would end it (expired), and is dropped too: a user whose sessions went silent is not
-- refused until that visit. False when no room can be made: all of them are live and refreshed
-- within ttl.
-- (An entry is at least 29 bytes: its head, a session id of one byte and a PLAIN record; a
-- shorter value has room without a walk.)
local ROOMY = max_entries * (4 + 1 + PLAIN)
local function make_room(u)
  local rec = recs[u]
  if not rec or #rec < ROOMY then return true end
  while true do
    -- One walk: the entries, the earliest ended one, and the one silent longest past ttl.
    local n, ended, ended_at, silent, silent_at = 0, nil, nil, nil, nil
    local cutoff = ttl > 0 and now - ttl or -1
    for e, pos, rs in entry_after, rec, 0 do
      n = n + 1
      local flags, at = flags_at(rec, rs)
      if flags % 2 == 0 then
        if not ended_at or at < ended_at then ended, ended_at = {pos, e}, at end
      elseif at <= cutoff and (not silent_at or at < silent_at) then
        silent, silent_at = {pos, e}, at
      end
    end
    if n < max_entries then return true end
    local drop = ended or silent
    if not drop then return false end
    if not ended then
      left_reason = 'expired'
      session_ended(users[u], true, n > 1)
      left_reason = 'leave'
      doc_expired = doc_expired + 1
    end
    rec = ssub(rec, 1, drop[1] - 1) .. ssub(rec, drop[2] + 1)
    recs[u], touched[u] = rec, true
  end
end

-- Is stream entry (mh, ml, sh, sl) later than (rmh, rml, rsh, rsl)? (Versions without a seq: the
-- later entry wins; newer() in full otherwise.)
local function later(mh, ml, sh, sl, rmh, rml, rsh, rsl)
  if mh ~= rmh then return mh > rmh end
  if ml ~= rml then return ml > rml end
  if sh ~= rsh then return sh > rsh end
  return sl > rsl
end

-- Applies one session's event (unpacked from `packed`, read up to p) to the record of session
-- `sid` of user u, its entry in recs[u] at `pos`, its record from rs to re (pos nil: none).
-- Returns its outcome code and where the event's ids begin in `packed`.
local function apply_session(packed, p, u, sid, pos, rs, re, lf, qh, ql, mh, ml, sh, sl, lih,
    idlen, elen)
  local raw = pos and ssub(recs[u], rs, re)
  -- The stored flags, time and version (rq: it has a seq), its event id hash, and where the
  -- rest begins.
  local rf, rt, rq, rqh, rql, rmh, rml, rsh, rsl, rih, rp = 0, nil, false, 0, 0, 0, 0, 0, 0, nil, 1
  if raw then
    local first, flags = sbyte(raw, 1, 2)
    local current = first == MARKER
    -- (Every record in the records hash is of the current layout, as migrate() writes them; a
    -- damaged one is read as an earlier layout would be, and fails the step if it is none.)
    if not current then raw, flags = load_record(raw) end
    -- Head and version in one go (a record of an earlier layout has no time: rt stays nil).
    local th, tl, _m
    rq = flags % 4 >= 2
    if flags % 64 < 32 then
      if rq then
        _m, rf, th, tl, rqh, rql, rmh, rml, rsl, rih, rp = sunpack(RQ, raw)
      else
        _m, rf, th, tl, rmh, rml, rsl, rih, rp = sunpack(R, raw)
      end
    elseif rq then
      _m, rf, th, tl, rqh, rql, rmh, rml, rsh, rsl, rih, rp = sunpack(RQW, raw)
    else
      _m, rf, th, tl, rmh, rml, rsh, rsl, rih, rp = sunpack(RW, raw)
    end
    if current then rt = th * TWO32 + tl end
  end
  local was_live = rf % 2 == 1
  local dirty = false
  local outcome = 1
  -- Is the event newer than the stored version? (later() when neither has a seq.)
  local lq, win = lf % 4 >= 2, true
  if not raw then
    win = true
  elseif lq or rq then
    win = newer(lq, qh, ql, mh, ml, sh, sl, rq, rqh, rql, rmh, rml, rsh, rsl)
  else
    win = later(mh, ml, sh, sl, rmh, rml, rsh, rsl)
  end
  if win then
    outcome = (rih == lih) and 2 or 0
    -- The new liveness, seq and sequence width; not expired; the meta flags kept.
    rf = (rf - rf % 64) + (rf % 32 - rf % 8) + lf % 4 + (sh > 0 and 32 or 0)
    rqh, rql, rmh, rml, rsh, rsl, rih = qh, ql, mh, ml, sh, sl, lih
    dirty = true
  elseif rih == lih then
    outcome = 2
  end
  -- What follows the version in the record (meta version and meta), when it changes.
  local tail = nil
  if lf % 16 >= 8 then
    local mqh, mql, mmh, mml, msh, msl
    mqh, mql, mmh, mml, msh, msl, p = sunpack(META_WRITE, packed, p)
    local meta = ''
    if lf >= 32 then meta, p = sunpack(BYTES, packed, p) end
    local mq = lf % 32 >= 16
    local mnewer = rf % 16 < 8
    if not mnewer then
      local q2 = rf % 32 >= 16
      local qh2, ql2, mh2, ml2, sh2, sl2 = unpack_version(raw, rp, q2, rf >= 64)
      mnewer = newer(mq, mqh, mql, mmh, mml, msh, msl, q2, qh2, ql2, mh2, ml2, sh2, sl2)
    end
    if mnewer then
      tail = pack_version(mq, mqh, mql, mmh, mml, msh, msl) .. meta
      rf = rf % 8 + (rf % 64 - rf % 32) + 8 + (mq and 16 or 0) + (msh > 0 and 64 or 0)
      dirty = true
    end
  end
  -- A new session of a user who already has max_entries live ones is refused ('3': the worker
  -- dead-letters its events); nothing changes.
  if dirty and not pos and not make_room(u) then return '3', p end
  if dirty then
    cause_text, cause_at, cause_id_len, cause_entry_len = packed, p, idlen, elen
    -- The record's time: now when the session is refreshed or ends; else (a stale event that
    -- only brought newer meta, which does not refresh the session) the time it had.
    local th, tl = now_hi, now_lo
    if rf % 2 == 1 then
      if outcome == 1 then
        th, tl = halves(rt or now)
      elseif not was_live then
        session_live(users[u], live_others(recs[u], pos))
      end
    elseif was_live or outcome == 0 then
      session_ended(users[u], was_live, was_live and live_others(recs[u], pos))
    else
      th, tl = halves(rt or now)
    end
    local head
    if rf % 64 < 32 then
      if rf % 4 >= 2 then
        head = spack(RQ, MARKER, rf, th, tl, rqh, rql, rmh, rml, rsl, rih)
      else
        head = spack(R, MARKER, rf, th, tl, rmh, rml, rsl, rih)
      end
    elseif rf % 4 >= 2 then
      head = spack(RQW, MARKER, rf, th, tl, rqh, rql, rmh, rml, rsh, rsl, rih)
    else
      head = spack(RW, MARKER, rf, th, tl, rmh, rml, rsh, rsl, rih)
    end
    if not tail then tail = raw and ssub(raw, rp) or '' end
    recs[u], touched[u] = put_entry(recs[u], pos, re, sid, head .. tail), true
  end
  return OUTCOME[outcome], p
end

-- Reads the records of the step's users (recs, above), once the document is in the records hash
-- (migrate(): asked only when none of them has a record, as in a document of an earlier
-- version, which moves whole: once one user has a record, all the document's records moved).
local function read_records()
  for _ = 1, 2 do
    if nu == 1 then
      one_rec[1] = rcall('HGET', KEYS[K], users[1])
      recs = one_rec
      if recs[1] then return end
    else
      recs = in_chunks('HMGET', KEYS[K], users, 1)
      for u = 1, nu do
        if recs[u] then return end
      end
    end
    if not migrate() then return end
  end
end

local function apply_doc(di)
  begin_doc(di, ARGV[a])
  doc_expired = 0
  local packed = ARGV[a + 1]
  a = a + 2
  local n, first, p
  nu, n, first, p = sunpack(COUNTS, packed)
  if nu == 1 then
    users, touched = one_user, one_touched
    one_user[1], one_touched[1] = first, nil
  else
    users, touched = {first}, {}
    for u = 2, nu do users[u], p = sunpack(BYTES, packed, p) end
  end
  read_records()
  -- The outcomes, one character per session (a document of one session needs no table).
  local out, code = n > 1 and {} or nil, nil
  for k = 1, n do
    local u, sid, lf, qh, ql, mh, ml, sh, sl, lih, idlen, elen
    u, sid, lf, sh, qh, ql, mh, ml, sl, lih, idlen, elen, p = sunpack(SESSION, packed, p)
    local rec = recs[u]
    local pos, rs, re = find_entry(rec, sid)
    code = nil
    -- The common case, a refresh, in a few steps (apply_session gives the same): a live event
    -- without meta nor 64-bit stream id sequence (flags 1, or 3 with a seq) and a live record of
    -- the current layout with the same seq flag, not expired, without 64-bit sequence (flags
    -- 8, 16 and 64, its meta version, may be set: the meta after the hash stays as it is),
    -- rewritten in place: its flags stay the same.
    if pos and sh == 0 then
      -- The event's version against the record's (later() and newer() inlined), the record's
      -- marker and flags, and the length of its head, version and hash (nil: not this case).
      local win, rih, vlen, m, f
      if lf == 1 then
        if re - rs >= PLAIN - 1 then
          local rmh, rml, rsl
          m, f, rmh, rml, rsl, rih = sunpack(R_VERSION, rec, rs)
          if mh ~= rmh then
            win = mh > rmh
          elseif ml ~= rml then
            win = ml > rml
          else
            win = sl > rsl
          end
          vlen = PLAIN
        end
      elseif lf == 3 and re - rs >= PLAIN + 7 then
        -- The higher seq wins; for equal seq, the earlier stream entry.
        local rqh, rql, rmh, rml, rsl
        m, f, rqh, rql, rmh, rml, rsl, rih = sunpack(RQ_VERSION, rec, rs)
        if qh ~= rqh then
          win = qh > rqh
        elseif ql ~= rql then
          win = ql > rql
        elseif mh ~= rmh then
          win = mh < rmh
        elseif ml ~= rml then
          win = ml < rml
        else
          win = sl < rsl
        end
        vlen = PLAIN + 8
      end
      if vlen and m == MARKER and f % 8 == lf and f % 64 < 32 then
        if win then
          code = rih == lih and '2' or '0'
          cause_text, cause_at, cause_id_len, cause_entry_len = packed, p, idlen, elen
          local head = refreshed_head[f]
          if not head then
            head = spack(HEAD, MARKER, f, now_hi, now_lo)
            refreshed_head[f] = head
          end
          -- The entry's head and session id kept (same lengths), the record's head new, its
          -- version and hash the event's bytes as packed (seq when it has one, ms, low half of
          -- the sequence, hash: the bytes before the id lengths), then the rest as it was.
          recs[u] = ssub(rec, 1, rs - 1) .. head .. ssub(packed, p + 3 - vlen, p - 6)
            .. ssub(rec, rs + vlen)
          touched[u] = true
        else
          code = rih == lih and '2' or '1'
        end
      end
    end
    if not code then
      code, p = apply_session(packed, p, u, sid, pos, rs, re, lf, qh, ql, mh, ml, sh, sl, lih,
        idlen, elen)
    end
    if out then out[k] = code end
    p = p + idlen + elen
  end
  write_records()
  if went_live and present >= LARGE then widen(KEYS[K]) end
  results[3 * di + 1] = out and table.concat(out) or code or ''
  results[3 * di + 2] = doc_expired > 0 and finish_doc() .. ';' .. doc_expired or finish_doc()
  results[3 * di + 3] = ','
end
with_globals(write_records, function()
  for di = 0, tonumber(ARGV[4]) - 1 do apply_doc(di) end
end)
return table.concat(results)
