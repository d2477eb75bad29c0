-- delete_idle_consumer.lua: removes a consumer only when it has nothing pending.
--
-- KEYS[1] events stream
-- ARGV[1] group, ARGV[2] consumer
--
-- Returns the number of pending entries deleted with it (always 0), or -1 when it was kept.
-- Checked and done in one step: a consumer deleted with pending entries would make them
-- unclaimable.

local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then
  return -1
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
