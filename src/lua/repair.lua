-- repair.lua: checks one document's derived state against its session records and, with
-- ARGV[4] = "1", rebuilds it, in one atomic step. ARGV[5] is the document id.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- The session records are the truth. From them follow: the users set (users with a live
-- session), the count, the per-user live counts, the document's due time in the expiry index
-- (when it has live sessions and they expire), and the global stats and top index.
--
-- Returns the problems found, one readable line each (empty: consistent).

local fix = ARGV[4] == '1'
exact_due = true
begin_doc(0, ARGV[5])
local problems = {}
local function say(msg) problems[#problems + 1] = msg end

local records = redis.call('HGETALL', KEYS[K])
local want_live = {}      -- user -> live sessions
local nlive = 0
local first_live, first_ended = nil, nil
for i = 1, #records, 2 do
  local field = records[i]
  local _, flags, at = load_record(records[i + 1])
  at = at or indexed_time(field, flags % 2 == 1)
  if flags % 2 == 0 then
    if not first_ended or at < first_ended then first_ended = at end
  else
    if not first_live or at < first_live then first_live = at end
    local user = user_of(field)
    want_live[user] = (want_live[user] or 0) + 1
    nlive = nlive + 1
  end
end

local users = redis.call('SMEMBERS', users_key())
local in_set = {}
for _, u in ipairs(users) do
  in_set[u] = true
  if not want_live[u] then say('user ' .. u .. ' is in the users set without a live session') end
end
local nwant = 0
for u, n in pairs(want_live) do
  nwant = nwant + 1
  if not in_set[u] then say('user ' .. u .. ' has ' .. n .. ' live session(s) but is not in the users set') end
end
local count = redis.call('GET', dkey('count'))
if (tonumber(count) or 0) ~= #users or (count and #users == 0) then
  say('count is ' .. tostring(count) .. ' but the users set has ' .. #users)
end
local live = redis.call('HGETALL', live_key())
local had_live = 0
local seen = {}
for i = 1, #live, 2 do
  local u, n = live[i], tonumber(live[i + 1])
  had_live = had_live + n
  seen[u] = true
  if want_live[u] ~= n then
    say('live count of ' .. u .. ' is ' .. n .. ', the sessions say ' .. (want_live[u] or 0))
  end
end
for u, n in pairs(want_live) do
  if not seen[u] then say('live count of ' .. u .. ' is missing, the sessions say ' .. n) end
end
if ttl > 0 and nlive > 0 and not redis.call('ZSCORE', KEYS[1], doc) then
  say('the document has live sessions but no due time in the expiry index')
end

if fix and #problems > 0 then
  redis.call('DEL', users_key(), live_key())
  for u, n in pairs(want_live) do
    redis.call('SADD', users_key(), u)
    redis.call('HSET', live_key(), u, n)
  end
  d_users, d_sessions = nwant - #users, nlive - had_live
  if nwant > 0 then
    redis.call('PERSIST', KEYS[K])
    redis.call('PERSIST', dkey('ended'))
  end
  present = redis.call('SCARD', users_key())
  before = -1 -- make finish_doc() rewrite the count and the indexes
  exact_next = next_due(first_live, first_ended)
  with_globals(nil, finish_doc)
end
return problems
