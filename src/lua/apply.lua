-- apply.lua: applies the coalesced events of several documents, each in one atomic step.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- ARGV[4] number of documents; then per document three arguments: its id, its number of
-- sessions, and its sessions packed in one string (struct.pack, big-endian; every u64 as two u32
-- halves, hi then lo), one after the other:
--   flags (u8): 1 live, 2 has a seq, 8 writes meta, 16 that write has a seq, 32 it sets meta
--     (else it clears it)
--   seq (u64, 0 without), stream id ms and sequence (u64 each), event id hash (u32)
--   user length (u32: the user is the field's prefix), event id length (u32), entry id length (u8)
--   field (u32 length, then its bytes)
--   with flag 8: the meta write's seq, stream id ms and sequence (u64 each) and, with flag 32,
--     the meta bytes (u32 length, then the bytes)
--   the event id, then the entry id (`<ms>-<seq>`): read only for a snapshot request's cause.
--
-- Returns per document {outcomes, snapshot}: one outcome per session (0 applied, 1 stale,
-- 2 duplicate: the same event as the winner), and the reason of the snapshot request queued ('').

local SESSION = '>BI4I4I4I4I4I4I4I4I4BI4c0'
local META_WRITE = '>I4I4I4I4I4I4'
local BYTES = '>I4c0'

local a = 5
local results = {}
for di = 0, tonumber(ARGV[4]) - 1 do
  begin_doc(di, ARGV[a])
  local n = tonumber(ARGV[a + 1])
  local packed = ARGV[a + 2]
  a = a + 3
  local p = 1
  local out = {}
  for k = 1, n do
    local lf, qh, ql, mh, ml, sh, sl, lih, ulen, idlen, elen, field
    lf, qh, ql, mh, ml, sh, sl, lih, ulen, idlen, elen, field, p = struct.unpack(SESSION, packed, p)
    local lq = lf % 4 >= 2
    local raw = redis.call('HGET', KEYS[K + 3], field)
    local r = raw and cmsgpack.unpack(raw) or {}
    local was_live = r.l == 1
    local dirty = false
    local outcome = 1
    local rnewer = r.m == nil
    if not rnewer then
      local rqh, rql = 0, 0
      if r.q then rqh, rql = decimal_halves(r.q) end
      local rmh, rml = halves(r.m)
      local rsh, rsl = halves(r.s)
      rnewer = newer(lq, qh, ql, mh, ml, sh, sl, r.q ~= nil, rqh, rql, rmh, rml, rsh, rsl)
    end
    if rnewer then
      outcome = (r.i == lih) and 2 or 0
      r.l = lf % 2
      if lq then r.q = decimal(qh, ql) else r.q = nil end
      r.m, r.s, r.i, r.x = mh * TWO32 + ml, sh * TWO32 + sl, lih, nil
      dirty = true
    elseif r.i == lih then
      outcome = 2
    end
    if lf % 16 >= 8 then
      local mqh, mql, mmh, mml, msh, msl
      mqh, mql, mmh, mml, msh, msl, p = struct.unpack(META_WRITE, packed, p)
      local meta = nil
      if lf >= 32 then meta, p = struct.unpack(BYTES, packed, p) end
      local mq = lf % 32 >= 16
      local mnewer = r.mm == nil
      if not mnewer then
        local rqh, rql = 0, 0
        if r.mq then rqh, rql = decimal_halves(r.mq) end
        local rmh, rml = halves(r.mm)
        local rsh, rsl = halves(r.ms)
        mnewer = newer(mq, mqh, mql, mmh, mml, msh, msl, r.mq ~= nil, rqh, rql, rmh, rml, rsh, rsl)
      end
      if mnewer then
        if mq then r.mq = decimal(mqh, mql) else r.mq = nil end
        r.mm, r.ms = mmh * TWO32 + mml, msh * TWO32 + msl
        r.d = meta
        dirty = true
      end
    end
    out[k] = outcome
    if dirty then
      cause_text, cause_at, cause_id_len, cause_entry_len = packed, p, idlen, elen
      if r.l == 1 then
        -- A stale event that only brought newer meta does not refresh the session.
        if outcome ~= 1 then
          session_live(field, not was_live and string.sub(field, 1, ulen), was_live, raw ~= nil)
        end
      elseif was_live or outcome == 0 then
        session_ended(field, was_live and string.sub(field, 1, ulen), was_live)
      end
      redis.call('HSET', KEYS[K + 3], field, cmsgpack.pack(r))
    end
    p = p + idlen + elen
  end
  results[di + 1] = {out, finish_doc()}
end
return results
