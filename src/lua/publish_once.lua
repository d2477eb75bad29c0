-- publish_once.lua: appends snapshot requests to the snapshot stream, each at most once (the
-- cluster flush; on a single Redis flush.lua does the whole move atomically).
--
-- KEYS[1] snapshots STREAM the snapshot stream
-- KEYS[2] seen      ZSET   request ids already appended -> server ms (same hash slot as KEYS[1])
-- ARGV[1] how long ids are remembered, ms; then pairs: request id, request (MessagePack)
--
-- A request whose id was appended before (a flush that stopped before emptying the outbox) is
-- skipped, so a repeated flush never repeats a request. Returns the number appended.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('ZADD', KEYS[2], 'NX', now, ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i + 1])
    added = added + 1
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[1]))
return added
