-- settle_resync: ARGV = tag, user, device, the owed resync as read. Clears it if unchanged.
local dkey = dk(ARGV[2], ARGV[3])
if (redis.call('HGET', T .. ':rs', dkey) or '') == ARGV[4] then redis.call('HDEL', T .. ':rs', dkey) end
return 'ok'
