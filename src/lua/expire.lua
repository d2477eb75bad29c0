-- expire.lua: ends the sessions not refreshed within ttl, as if they had left, in several
-- documents, each in one atomic step.
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
local max = tonumber(ARGV[5])
local results = {}
local function expire_doc(di)
  begin_doc(di, ARGV[6 + di])
  left_reason, cause_event, cause_entry = 'expired', 'expiry', ''
  local due = redis.call('ZRANGEBYSCORE', KEYS[K + 6], '-inf', cutoff, 'LIMIT', 0, max)
  local expired = 0
  for _, field in ipairs(due) do
    local raw, flags = load_record(redis.call('HGET', KEYS[K + 3], field))
    if flags % 2 == 1 then
      local user = string.sub(field, 1, string.find(field, '\31', 1, true) - 1)
      session_ended(field, user, true)
      -- Ended (flag 1 off) by expiry (flag 4 on).
      flags = flags - 1
      if flags % 8 < 4 then flags = flags + 4 end
      redis.call('HSET', KEYS[K + 3], field, string.char(flags) .. string.sub(raw, 2))
      expired = expired + 1
    else
      redis.call('ZREM', KEYS[K + 6], field)
    end
  end
  results[di + 1] = {expired, finish_doc()}
end
with_globals(function()
  for di = 0, tonumber(ARGV[4]) - 1 do expire_doc(di) end
end)
return results
