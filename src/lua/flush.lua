-- flush.lua: moves one document's queued snapshot requests to the snapshot stream.
--
-- KEYS[1] outbox    LIST  sessions:doc:{<doc>}:outbox, requests in the order they were decided
-- KEYS[2] outboxes  SET   documents whose outbox is not empty
-- KEYS[3] snapshots STREAM the snapshot stream
-- ARGV[1] document id
--
-- One atomic step on a single Redis: each request reaches the stream exactly once. (On a cluster
-- the keys live in different slots; the worker then flushes without this script, and a crash
-- between XADD and LTRIM can repeat a request with the same snapshot_id.)
--
-- Returns the number of requests flushed.

local items = redis.call('LRANGE', KEYS[1], 0, -1)
for _, request in ipairs(items) do
  redis.call('XADD', KEYS[3], '*', 'e', request)
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return #items
