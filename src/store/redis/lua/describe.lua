-- describe (reads only): ARGV = tag, user, then devices ('' alone: every device of the user).
-- Returns the user's version, then per device: device, record, queue length, queue bytes,
-- overflowed, owed resync, oldest queued-at.
local user = ARGV[2]
local u = T .. ':u:' .. user
local devices = {}
if #ARGV == 2 then
  for _, field in ipairs(redis.call('HKEYS', u)) do
    if field:sub(1, 1) == 'd' then table.insert(devices, field:sub(2)) end
  end
else
  for j = 3, #ARGV do table.insert(devices, ARGV[j]) end
end
local out = {redis.call('HGET', u, 'v') or ''}
for _, device in ipairs(devices) do
  local record = redis.call('HGET', u, 'd' .. device)
  if record then
    local dkey = dk(user, device)
    local oldest = ''
    local first = redis.call('ZRANGE', T .. ':q:' .. dkey, 0, 0)[1]
    if first then
      local _, _, at = parse(redis.call('HGET', T .. ':qv:' .. dkey, first))
      oldest = at
    end
    for _, v in ipairs({device, record, redis.call('ZCARD', T .. ':q:' .. dkey),
        redis.call('HGET', T .. ':qb', dkey) or '0', redis.call('HGET', T .. ':of', dkey) or '',
        redis.call('HGET', T .. ':rs', dkey) or '', oldest}) do
      table.insert(out, v)
    end
  end
end
return out
