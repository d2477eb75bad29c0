-- expire.lua: ends the sessions of one document not refreshed within ttl, as if they had left.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- ARGV[5] most sessions to expire in this call.
-- Uses Redis server time only. Idempotent: a session expires once, whoever runs it; a session
-- refreshed meanwhile is not touched. Its version is kept, so a newer event makes it live again
-- and an older redelivered one stays stale.
--
-- Returns {sessions expired, snapshot reason ('' for none)}.

local cutoff = now - ttl
local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[5]))
left_reason, cause_event, cause_entry = 'expired', 'expiry', ''
local expired = 0
for _, field in ipairs(due) do
  local raw = redis.call('HGET', KEYS[3], field)
  local r = raw and cmsgpack.unpack(raw) or nil
  if r ~= nil and r.l == 1 then
    local user = string.sub(field, 1, string.find(field, '\31', 1, true) - 1)
    r.l, r.x, r.t = 0, 1, now
    session_ended(field, user, true)
    redis.call('HSET', KEYS[3], field, cmsgpack.pack(r))
    expired = expired + 1
  else
    redis.call('ZREM', KEYS[6], field)
  end
end
return {expired, finish()}
