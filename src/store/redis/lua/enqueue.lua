-- enqueue: ARGV = tag, queued-at, event, size, entry, max_len, max_bytes, idempotency key ('' for
-- none), its record as read ('' if none), its new record, its expiry, then counted lists:
-- (user, version) pairs read, (user, device, node) triples to forget, (user, device, connected)
-- triples to queue for. Returns 'ok', the id, for each device queued for the newest id its queue
-- held before ('0': none; only for a connected device, else '0'), then (index in the queue list,
-- messages dropped) pairs.
local at, event, size, entry = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local max_len, max_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local key, key_read, key_new, key_expires = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local i = 13
for _ = 1, tonumber(ARGV[12]) do
  if not same_version(ARGV[i], ARGV[i + 1]) then return {'changed'} end
  i = i + 2
end
if key ~= '' then
  if (redis.call('HGET', T .. ':k', key) or '') ~= key_read then return {'changed'} end
  redis.call('HSET', T .. ':k', key, key_new)
  redis.call('ZADD', T .. ':kx', key_expires, key)
end
local id = int(redis.call('INCR', T .. ':ids'))
local touched = {}
local forgets = tonumber(ARGV[i])
i = i + 1
for _ = 1, forgets do
  forget(ARGV[i], ARGV[i + 1], ARGV[i + 2])
  touched[ARGV[i]] = true
  i = i + 3
end
local count = tonumber(ARGV[i])
i = i + 1
local shared = count > 1
if shared then
  redis.call('HSET', T .. ':b', id, entry)
  redis.call('HSET', T .. ':n', id, count)
end
local value = (shared and 's' or 'i') .. size .. ',' .. at .. ',' .. #event .. ':' .. event .. (shared and '' or entry)
local out = {'ok', id}
local dropped_at = {}
for n = 0, count - 1 do
  local dkey = dk(ARGV[i], ARGV[i + 1])
  local connected = ARGV[i + 2] ~= ''
  i = i + 3
  local q = T .. ':q:' .. dkey
  table.insert(out, connected and (redis.call('ZRANGE', q, -1, -1)[1] or '0') or '0')
  redis.call('ZADD', q, id, id)
  redis.call('HSET', T .. ':qv:' .. dkey, id, value)
  redis.call('ZADD', T .. ':e:' .. dkey .. event, id, id)
  local bytes = redis.call('HINCRBY', T .. ':qb', dkey, size)
  local len = redis.call('ZCARD', q)
  local dropped = 0
  -- QueueLimits::exceeded (store/rules.rs), which must run inside the append: drop the oldest
  -- while over a cap, never the last entry.
  while len > 1 and (len > max_len or bytes > max_bytes) do
    bytes = bytes - remove_entry(dkey, redis.call('ZRANGE', q, 0, 0)[1])
    len = len - 1
    dropped = dropped + 1
  end
  if dropped > 0 then
    redis.call('HSET', T .. ':of', dkey, '1')
    table.insert(dropped_at, n)
    table.insert(dropped_at, dropped)
  end
end
totals('queued_messages', count)
totals('queued_bytes', count * size)
for user in pairs(touched) do bump(user) end
for _, v in ipairs(dropped_at) do table.insert(out, v) end
return out
