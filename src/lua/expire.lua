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
  local all = redis.call('HGETALL', KEYS[K])
  local expired, migrated = 0, false
  local pruned = {}
  local first_live, first_ended = nil, nil
  for i = 1, #all, 2 do
    local field = all[i]
    local raw, flags, at = load_record(all[i + 1])
    local live = flags % 2 == 1
    -- A record of an earlier layout (no time): its time is its score in the earlier index, and
    -- it is rewritten in the current layout below, unless it expires or is pruned.
    local earlier = not at
    if earlier then at, migrated = indexed_time(field, live), true end
    if live and ttl > 0 and at <= cutoff and expired < max then
      session_ended(user_of(field), true)
      -- Ended (flag 1 off) by expiry (flag 4 on), now.
      flags = flags - 1
      if flags % 8 < 4 then flags = flags + 4 end
      redis.call('HSET', KEYS[K], field, with_head(raw, flags, now_hi, now_lo))
      expired = expired + 1
      if not first_ended then first_ended = now end
    elseif not live and at <= prune_before then
      pruned[#pruned + 1] = field
    else
      if live then
        if not first_live or at < first_live then first_live = at end
      elseif not first_ended or at < first_ended then
        first_ended = at
      end
      if earlier then
        redis.call('HSET', KEYS[K], field, with_head(raw, flags, halves(at)))
      end
    end
  end
  if #pruned > 0 then in_chunks('HDEL', KEYS[K], pruned, 1) end
  if migrated then redis.call('DEL', dkey('ended'), dkey('alive')) end
  exact_next = next_due(first_live, first_ended)
  results[di + 1] = {expired, finish_doc()}
end
with_globals(nil, function()
  for di = 0, tonumber(ARGV[4]) - 1 do expire_doc(di) end
end)
return results
