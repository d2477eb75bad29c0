-- outbox_done.lua: removes requests that reached the snapshot stream from the head of a
-- document's outbox (the cluster flush, after publish_once.lua).
--
-- KEYS[1] outbox    LIST sessions:doc:{<doc>}:outbox
-- KEYS[2] outboxes  SET  documents of this hash slot whose outbox is not empty
-- ARGV[1] document id; ARGV[2..] the requests appended, in outbox order
--
-- Only a head equal to the next appended request is removed, so a concurrent flush of the same
-- outbox never removes a request that was not appended. Returns the number removed.

local removed = 0
for i = 2, #ARGV do
  if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[i] then break end
  redis.call('LPOP', KEYS[1])
  removed = removed + 1
end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return removed
