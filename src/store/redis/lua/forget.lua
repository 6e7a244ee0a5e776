-- forget (the sweep): ARGV = tag, user, version read, then (device, node) pairs.
local user = ARGV[2]
if not same_version(user, ARGV[3]) then return 'changed' end
for i = 4, #ARGV, 2 do forget(user, ARGV[i], ARGV[i + 1]) end
bump(user)
return 'ok'
