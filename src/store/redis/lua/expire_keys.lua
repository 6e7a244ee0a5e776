-- expire_keys (the sweep): ARGV = tag, now, then idempotency keys found expired in `T:kx`.
-- Each is dropped unless it was stored again meanwhile with a later expiry.
local now, dropped = tonumber(ARGV[2]), 0
for j = 3, #ARGV do
  local expires = redis.call('ZSCORE', T .. ':kx', ARGV[j])
  if expires and tonumber(expires) <= now then
    redis.call('ZREM', T .. ':kx', ARGV[j])
    redis.call('HDEL', T .. ':k', ARGV[j])
    dropped = dropped + 1
  end
end
return dropped
