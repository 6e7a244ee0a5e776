-- load: ARGV = tag, then records, each a kind and its fields:
--   'u' user, count, rooms...                the user's (lowercased) room list, replaced
--   'd' user, device, record, disconnected at, overflowed ('1' or ''), owed resync ('' if none)
--   'm' user, device, id, queued-at, event, entry, shared ('1' or '')
--   'i' the last id given out
--   'k' key, fingerprint:expiry, expiry
-- A device, message or idempotency key already held is skipped. Returns {written, skipped}, or
-- {'unknown', user, device} for a message of a device neither held nor loaded.
local written, skipped, touched = 0, 0, {}
local i = 2
local function count(done) if done then written = written + 1 else skipped = skipped + 1 end end
while i <= #ARGV do
  local kind = ARGV[i]
  if kind == 'u' then
    local user, n = ARGV[i + 1], tonumber(ARGV[i + 2])
    local rl = T .. ':rl:' .. user
    for _, room in ipairs(redis.call('SMEMBERS', rl)) do redis.call('SREM', T .. ':r:' .. room, user) end
    redis.call('DEL', rl)
    for j = i + 3, i + 2 + n do
      redis.call('SADD', rl, ARGV[j])
      redis.call('SADD', T .. ':r:' .. ARGV[j], user)
    end
    touched[user] = true
    count(true)
    i = i + 3 + n
  elseif kind == 'd' then
    local user, device, record, at, overflowed, resync = unpack(ARGV, i + 1, i + 6)
    local dkey = dk(user, device)
    local new = redis.call('HSETNX', T .. ':u:' .. user, 'd' .. device, record) == 1
    if new then
      totals('devices', 1)
      redis.call('ZADD', T .. ':t', at, dkey)
      if overflowed ~= '' then redis.call('HSET', T .. ':of', dkey, '1') end
      if resync ~= '' then redis.call('HSET', T .. ':rs', dkey, resync) end
      touched[user] = true
    end
    count(new)
    i = i + 7
  elseif kind == 'm' then
    local user, device, id, at, event, entry, shared = unpack(ARGV, i + 1, i + 7)
    if redis.call('HEXISTS', T .. ':u:' .. user, 'd' .. device) == 0 then return {'unknown', user, device} end
    local dkey = dk(user, device)
    local qv = T .. ':qv:' .. dkey
    local new = redis.call('HEXISTS', qv, id) == 0
    if new then
      local size = #entry
      if shared ~= '' then
        redis.call('HSETNX', T .. ':b', id, entry)
        redis.call('HINCRBY', T .. ':n', id, 1)
      end
      local value = (shared ~= '' and 's' or 'i') .. size .. ',' .. at .. ',' .. #event .. ':' .. event ..
        (shared ~= '' and '' or entry)
      redis.call('ZADD', T .. ':q:' .. dkey, id, id)
      redis.call('HSET', qv, id, value)
      redis.call('ZADD', T .. ':e:' .. dkey .. event, id, id)
      redis.call('HINCRBY', T .. ':qb', dkey, size)
      totals('queued_messages', 1)
      totals('queued_bytes', size)
      if tonumber(id) > tonumber(redis.call('GET', T .. ':ids') or '0') then redis.call('SET', T .. ':ids', id) end
    end
    count(new)
    i = i + 8
  elseif kind == 'i' then
    local last = ARGV[i + 1]
    local raised = tonumber(last) > tonumber(redis.call('GET', T .. ':ids') or '0')
    if raised then redis.call('SET', T .. ':ids', last) end
    count(raised)
    i = i + 2
  elseif kind == 'k' then
    local new = redis.call('HSETNX', T .. ':k', ARGV[i + 1], ARGV[i + 2]) == 1
    if new then redis.call('ZADD', T .. ':kx', ARGV[i + 3], ARGV[i + 1]) end
    count(new)
    i = i + 4
  else
    return redis.error_reply('load: unknown record kind ' .. tostring(kind))
  end
end
for user in pairs(touched) do bump(user) end
return {int(written), int(skipped)}
