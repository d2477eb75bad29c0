-- lease.lua: the first half of a leased read (see src/lease.rs). It runs in one MULTI just
-- before `XREADGROUP GROUP <group> <consumer> COUNT <count> NOACK STREAMS <stream> >`, which
-- delivers entries without putting them in the pending-entries list: this script records, in the
-- same atomic step, which entries that read takes (the `count` entries after the group's
-- last-delivered id), so that a crash loses nothing.
--
-- KEYS[1] the stream, KEYS[2] the group's leases hash.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] now (ms).
--
-- When the read could reach the end of the stream (the group's lag is unknown or at most
-- `count`), this script reads through the pending-entries list itself: the last batch of a
-- backlog is then pending until acknowledged, so "no lag and nothing pending" still means
-- everything delivered was applied. If that read came back short it reached the end, and the
-- NOACK read after it finds nothing: no lease.
--
-- Returns {the lease's field or false, the entries read here (or an empty table)}. The field is
-- `<last-delivered id>|<consumer>`, its value `<count>|<now>|<attempts>`.
local stream, leases = KEYS[1], KEYS[2]
local group, consumer, count, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local last, lag, found = nil, false, false
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local name, id, behind
  for i = 1, #g, 2 do
    local k = g[i]
    if k == 'name' then name = g[i + 1]
    elseif k == 'last-delivered-id' then id = g[i + 1]
    elseif k == 'lag' then behind = g[i + 1] end
  end
  if name == group then
    last, lag, found = id, behind, true
    break
  end
end
-- No such group: the read after fails with NOGROUP, and the worker creates it again.
if not found then return {false, {}} end
local entries = {}
if not lag or lag <= count then
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS',
    stream, '>')
  if reply then entries = reply[1][2] end
  if #entries < count then return {false, entries} end
  last = entries[#entries][1]
end
local field = last .. '|' .. consumer
redis.call('HSET', leases, field, count .. '|' .. now .. '|1')
return {field, entries}
