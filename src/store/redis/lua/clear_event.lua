-- clear_event (an ack out of order): ARGV = tag, user, device, event, the number and the newest
-- of the event's queued ids as read, then those ids. Removes them and owes the device a
-- `_resync`, numbered like a message; returns 'ok', how many were removed and that number.
local dkey = dk(ARGV[2], ARGV[3])
local e = T .. ':e:' .. dkey .. ARGV[4]
local newest = redis.call('ZRANGE', e, -1, -1)[1] or ''
if redis.call('ZCARD', e) ~= tonumber(ARGV[5]) or newest ~= ARGV[6] then return {'changed'} end
local ids = {}
for j = 7, #ARGV do table.insert(ids, ARGV[j]) end
local cleared = remove_entries(dkey, ids)
local seq = int(redis.call('INCR', T .. ':ids'))
redis.call('HSET', T .. ':rs', dkey, seq)
return {'ok', cleared, seq}
