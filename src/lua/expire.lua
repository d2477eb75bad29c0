-- expire.lua: visits due documents, each in one atomic step: ends the sessions not refreshed
-- within ttl, as if they had left, prunes the sessions that ended more than the history ago, and
-- sets the document's next due time (see common.lua).
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- ARGV[4] number of documents, ARGV[5] most sessions to expire per document, then the ids.
-- Uses Redis server time only. Idempotent: a session expires once, whoever runs it; a session
-- refreshed meanwhile is not touched. Its version is kept, so a newer event makes it live again
-- and an older redelivered one stays stale.
--
-- Returns per document {sessions expired, snapshot reason ('' for none)}.

exact_due = true
local cutoff = now - ttl
local prune_before = now - history
local max = tonumber(ARGV[5])
local results = {}

local function expire_doc(di)
  begin_doc(di, ARGV[6 + di])
  left_reason, cause_event, cause_entry = 'expired', 'expiry', ''
  migrate()
  local all = redis.call('HGETALL', KEYS[K])
  local expired = 0
  local first_live, first_ended = nil, nil
  local writes, drop = {}, {}
  for i = 1, #all, 2 do
    local user, rec = all[i], all[i + 1]
    -- The user's entries kept (an expired one rewritten: same length, same entry head), and
    -- their live sessions left.
    local kept, changed = {}, false
    local nlive = 0
    for _, _, rs in entry_after, rec, 0 do
      if sbyte(rec, rs + 1) % 2 == 1 then nlive = nlive + 1 end
    end
    for e, pos, rs in entry_after, rec, 0 do
      local flags, at = flags_at(rec, rs)
      local live = flags % 2 == 1
      if live and ttl > 0 and at <= cutoff and expired < max then
        nlive = nlive - 1
        session_ended(user, true, nlive > 0)
        -- Ended (flag 1 off) by expiry (flag 4 on), now.
        flags = flags - 1
        if flags % 8 < 4 then flags = flags + 4 end
        kept[#kept + 1] = ssub(rec, pos, rs - 1)
          .. with_head(ssub(rec, rs, e), flags, now_hi, now_lo)
        changed, expired = true, expired + 1
        if not first_ended then first_ended = now end
      elseif not live and at <= prune_before then
        changed = true
      else
        if live then
          if not first_live or at < first_live then first_live = at end
        elseif not first_ended or at < first_ended then
          first_ended = at
        end
        kept[#kept + 1] = ssub(rec, pos, e)
      end
    end
    if changed then
      if #kept > 0 then
        writes[#writes + 1], writes[#writes + 2] = user, table.concat(kept)
      else
        drop[#drop + 1] = user
      end
    end
  end
  if #writes > 0 then in_chunks('HSET', KEYS[K], writes, 2) end
  if #drop > 0 then in_chunks('HDEL', KEYS[K], drop, 1) end
  exact_next = next_due(first_live, first_ended)
  results[di + 1] = {expired, finish_doc()}
end
with_globals(nil, function()
  for di = 0, tonumber(ARGV[4]) - 1 do expire_doc(di) end
end)
return results
