-- disconnect: ARGV = tag, user, device, version read, new record, the node of its socket
-- ('' if it was not connected), disconnected at.
local user, device, version, record, node, at = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if not same_version(user, version) then return 'changed' end
local dkey = dk(user, device)
redis.call('HSET', T .. ':u:' .. user, 'd' .. device, record)
leave_node(dkey, node)
redis.call('ZADD', T .. ':t', at, dkey)
bump(user)
return 'ok'
