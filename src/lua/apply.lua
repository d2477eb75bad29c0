-- apply.lua: applies the coalesced events of several documents, each in one atomic step.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- ARGV[4] number of documents; then per document: its id, its number of sessions, and per
-- session 13 arguments: field, user, live kind ("1" live, "0" ended), seq ("" none), sid ms,
-- sid seq, event id, event id hash, meta kind ("" none, "1" set, "0" clear), meta seq, meta sid
-- ms, meta sid seq, meta bytes.
--
-- Returns per document {outcomes, snapshot}: one outcome per session (0 applied, 1 stale,
-- 2 duplicate: the same event as the winner), and the reason of the snapshot request queued ('').

local a = 5
local results = {}
for di = 0, tonumber(ARGV[4]) - 1 do
  begin_doc(di, ARGV[a])
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  local out = {}
  for k = 1, n do
    local field, user, lkind, lseq = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
    local lms, lss, lid, lih = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), ARGV[a + 6], tonumber(ARGV[a + 7])
    local mkind, mseq, mms, mss, meta = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11], ARGV[a + 12]
    a = a + 13
    local raw = redis.call('HGET', KEYS[K + 3], field)
    local r = raw and cmsgpack.unpack(raw) or {}
    local was_live = r.l == 1
    local dirty = false
    local outcome = 1
    if r.m == nil or newer(lseq, lms, lss, r.q, r.m, r.s) then
      outcome = (r.i == lih) and 2 or 0
      r.l = tonumber(lkind)
      if lseq ~= '' then r.q = lseq else r.q = nil end
      r.m, r.s, r.i, r.x = lms, lss, lih, nil
      dirty = true
    elseif r.i == lih then
      outcome = 2
    end
    if mkind ~= '' then
      mms, mss = tonumber(mms), tonumber(mss)
      if r.mm == nil or newer(mseq, mms, mss, r.mq, r.mm, r.ms) then
        if mseq ~= '' then r.mq = mseq else r.mq = nil end
        r.mm, r.ms = mms, mss
        if mkind == '1' then r.d = meta else r.d = nil end
        dirty = true
      end
    end
    out[k] = outcome
    if dirty then
      cause_event, cause_ms, cause_seq = lid, lms, lss
      if r.l == 1 then
        -- A stale event that only brought newer meta does not refresh the session.
        if outcome ~= 1 then session_live(field, user, was_live, raw ~= nil) end
      elseif was_live or outcome == 0 then
        session_ended(field, user, was_live)
      end
      redis.call('HSET', KEYS[K + 3], field, cmsgpack.pack(r))
    end
  end
  results[di + 1] = {out, finish_doc()}
end
return results
