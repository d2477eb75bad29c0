-- claim_due.lua: hands documents whose sessions are due to expire to one replica for a while.
--
-- KEYS[1] expiry  ZSET document -> server ms its first session is due to expire
-- ARGV[1] lease_ms: how long the claimed documents are hidden from other replicas
-- ARGV[2] most documents to claim
--
-- Returns the claimed document ids. A replica that dies holding a lease only delays expiry by
-- lease_ms: the documents become due again. expire.lua then sets each document's real due time.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local docs = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, doc in ipairs(docs) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), doc)
end
return docs
