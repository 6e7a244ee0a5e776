-- drop_node (the sweep, after a dead node's devices were disconnected): ARGV = tag, node.
if redis.call('SCARD', T .. ':cn:' .. ARGV[2]) == 0 then redis.call('SREM', T .. ':nodes', ARGV[2]) end
return 'ok'
