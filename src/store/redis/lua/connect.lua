-- connect: ARGV = tag, user, device, version read, new record, this node, the node of the
-- device's socket before ('' if it was not connected), '1' if the device is new, the number of
-- devices to forget, then (device, node) pairs, then the lowercased rooms.
local user, device, version, record, me, before, new = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if not same_version(user, version) then return {'changed'} end
local i = 10
for _ = 1, tonumber(ARGV[9]) do
  forget(user, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local dkey = dk(user, device)
redis.call('HSET', T .. ':u:' .. user, 'd' .. device, record)
if new == '1' then totals('devices', 1) end
leave_node(dkey, before)
redis.call('SADD', T .. ':cn:' .. me, dkey)
redis.call('SADD', T .. ':nodes', me)
totals('connected', 1)
redis.call('ZREM', T .. ':t', dkey)
local overflowed = redis.call('HGET', T .. ':of', dkey) or ''
local resync_at = redis.call('HGET', T .. ':rs', dkey) or ''
redis.call('HDEL', T .. ':of', dkey)
redis.call('HDEL', T .. ':rs', dkey)
local rl = T .. ':rl:' .. user
for _, room in ipairs(redis.call('SMEMBERS', rl)) do redis.call('SREM', T .. ':r:' .. room, user) end
redis.call('DEL', rl)
for j = i, #ARGV do
  redis.call('SADD', rl, ARGV[j])
  redis.call('SADD', T .. ':r:' .. ARGV[j], user)
end
bump(user)
return read_queue(dkey, {'ok', redis.call('GET', T .. ':ids') or '0', overflowed, resync_at})
