-- repair.lua: checks one document's derived state against its session records and, with
-- ARGV[4] = "1", rebuilds it, in one atomic step. ARGV[5] is the document id.
-- (common.lua is prepended: it documents KEYS, ARGV[1..3] and the session record.)
--
-- The session records are the truth. From them follow: the users set (users with a live
-- session), the count, the document's due time in the expiry index (when it has live sessions
-- and they expire), and the global stats and top index. A document still in an earlier
-- version's layout is read from it, and moved into the records hash when rebuilt.
--
-- Returns the problems found, one readable line each (empty: consistent).

local fix = ARGV[4] == '1'
exact_due = true
begin_doc(0, ARGV[5])
local problems = {}
local function say(msg) problems[#problems + 1] = msg end

if fix then migrate() end
local want_live = {}      -- user -> live sessions
local nlive = 0
local first_live, first_ended = nil, nil
local function record(user, flags, at)
  if flags % 2 == 0 then
    if not first_ended or at < first_ended then first_ended = at end
  else
    if not first_live or at < first_live then first_live = at end
    want_live[user] = (want_live[user] or 0) + 1
    nlive = nlive + 1
  end
end
local records = redis.call('HGETALL', KEYS[K])
for i = 1, #records, 2 do
  local user, rec = records[i], records[i + 1]
  for _, _, rs in entry_after, rec, 0 do record(user, flags_at(rec, rs)) end
end
-- (Checking only: a document not yet moved from an earlier version's sessions hash.)
local old = redis.call('HGETALL', dkey('sessions'))
for i = 1, #old, 2 do
  local field = old[i]
  local user = split_field(field)
  if user then
    local _, flags, at = load_record(old[i + 1])
    record(user, flags, at or indexed_time(field, flags % 2 == 1))
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
if ttl > 0 and nlive > 0 and not redis.call('ZSCORE', KEYS[1], doc) then
  say('the document has live sessions but no due time in the expiry index')
end

if fix and #problems > 0 then
  redis.call('DEL', users_key())
  for u in pairs(want_live) do redis.call('SADD', users_key(), u) end
  d_users = nwant - #users
  if nwant > 0 then redis.call('PERSIST', KEYS[K]) end
  present = redis.call('SCARD', users_key())
  before = -1 -- make finish_doc() rewrite the count and the indexes
  exact_next = next_due(first_live, first_ended)
  with_globals(nil, finish_doc)
end
return problems
