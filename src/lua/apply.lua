-- apply.lua: applies the coalesced events of one document in one atomic step.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- ARGV[5] n: number of sessions that follow, 12 arguments each:
--   field, user,
--   live kind ("1" live, "0" ended), seq ("" none), sid ms, sid seq, event id,
--   meta kind ("" none, "1" set, "0" clear), meta seq, meta sid ms, meta sid seq, meta bytes
--
-- Returns {outcomes, snapshot}: one outcome per session (0 applied, 1 stale, 2 duplicate: same
-- event id as the winner), and the reason of the snapshot request queued ('' for none).

local N = 12
local n = tonumber(ARGV[5])
local out = {}
for k = 0, n - 1 do
  local a = 6 + k * N
  local field, user = ARGV[a], ARGV[a + 1]
  local lkind, lseq, lms, lss, lid = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local mkind, mseq, mms, mss, meta = ARGV[a + 7], ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11]
  local raw = redis.call('HGET', KEYS[3], field)
  local r = raw and cmsgpack.unpack(raw) or {}
  local was_live = r.l == 1
  local dirty = false
  local outcome = 1
  if r.m == nil or newer(lseq, lms, lss, r.q, r.m, r.s) then
    outcome = (r.i == lid) and 2 or 0
    r.l = tonumber(lkind)
    if lseq ~= '' then r.q = lseq else r.q = nil end
    r.m, r.s, r.i, r.t, r.x = lms, lss, lid, now, nil
    dirty = true
  elseif r.i == lid then
    outcome = 2
  end
  if mkind ~= '' and (r.mm == nil or newer(mseq, mms, mss, r.mq, r.mm, r.ms)) then
    if mseq ~= '' then r.mq = mseq else r.mq = nil end
    r.mm, r.ms = mms, mss
    if mkind == '1' then r.d = meta else r.d = nil end
    dirty = true
  end
  out[k + 1] = outcome
  if dirty then
    cause_event, cause_entry = lid, lms .. '-' .. lss
    if r.l == 1 then
      -- A stale event that only brought newer meta does not refresh the session.
      if outcome ~= 1 then session_live(field, user, was_live) end
    elseif was_live or outcome == 0 then
      session_ended(field, user, was_live)
    end
    redis.call('HSET', KEYS[3], field, cmsgpack.pack(r))
  end
end
return {out, finish()}
