-- Storage mechanics shared by every script (prepended to each). No domain rule lives here: the
-- rules (store/rules.rs) run in Rust on what a script read, and a script applies the outcome
-- only if the versions it was computed from are still current (see ../mod.rs).
--
-- ARGV[1] is the site's key tag `{prefix:site}`; KEYS[1] is a key of that tag, so that a
-- cluster routes the script to the site's hash slot. Numbers cross as decimal strings.
local T = ARGV[1]

local function int(n) return string.format('%d', n) end

-- The key part of one device: self-delimiting, whatever bytes the names hold.
local function dk(user, device) return #user .. ':' .. user .. #device .. ':' .. device end

-- A queue entry's value: flag (`i` the entry follows, `s` it is shared under `T:b`), size,
-- queued-at, event length, event, then the entry when inline.
local function parse(v)
  local flag = v:sub(1, 1)
  local size, at, elen, rest = string.match(v, '^.(%d+),(%d+),(%d+):()')
  elen = tonumber(elen)
  return flag, tonumber(size), at, v:sub(rest, rest + elen - 1), v:sub(rest + elen)
end

local function same_version(user, version)
  return (redis.call('HGET', T .. ':u:' .. user, 'v') or '') == version
end

-- Every change to a user room's hash gives it a new version, unique in the site.
local function bump(user)
  local u = T .. ':u:' .. user
  if redis.call('EXISTS', u) == 1 then redis.call('HSET', u, 'v', redis.call('INCR', T .. ':ver')) end
end

local function totals(field, by)
  if by ~= 0 then redis.call('HINCRBY', T .. ':totals', field, by) end
end

-- Removes one queue entry; returns its size, or nil if it was not queued.
local function remove_entry(dkey, id)
  local qv = T .. ':qv:' .. dkey
  local v = redis.call('HGET', qv, id)
  if not v then return nil end
  local flag, size, _, event = parse(v)
  redis.call('HDEL', qv, id)
  redis.call('ZREM', T .. ':q:' .. dkey, id)
  redis.call('ZREM', T .. ':e:' .. dkey .. event, id)
  if flag == 's' and redis.call('HINCRBY', T .. ':n', id, -1) <= 0 then
    redis.call('HDEL', T .. ':n', id)
    redis.call('HDEL', T .. ':b', id)
  end
  redis.call('HINCRBY', T .. ':qb', dkey, -size)
  totals('queued_messages', -1)
  totals('queued_bytes', -size)
  return size
end

-- A device's queue, oldest first, as id, queued-at, entry triples.
local function read_queue(dkey, out)
  local qv = T .. ':qv:' .. dkey
  for _, id in ipairs(redis.call('ZRANGE', T .. ':q:' .. dkey, 0, -1)) do
    local flag, _, at, _, entry = parse(redis.call('HGET', qv, id))
    if flag == 's' then entry = redis.call('HGET', T .. ':b', id) end
    table.insert(out, id)
    table.insert(out, at)
    table.insert(out, entry)
  end
  return out
end

-- Marks a device's socket gone from `node` (the node that held it, '' if none).
local function leave_node(dkey, node)
  if node ~= '' then
    redis.call('SREM', T .. ':cn:' .. node, dkey)
    totals('connected', -1)
  end
end

-- Forgets a device with its queue; the user room too when it was its last device. `node` is
-- the node of its socket if it is connected, else ''.
local function forget(user, device, node)
  local dkey = dk(user, device)
  for _, id in ipairs(redis.call('ZRANGE', T .. ':q:' .. dkey, 0, -1)) do remove_entry(dkey, id) end
  redis.call('HDEL', T .. ':qb', dkey)
  redis.call('HDEL', T .. ':of', dkey)
  redis.call('HDEL', T .. ':rs', dkey)
  redis.call('ZREM', T .. ':t', dkey)
  leave_node(dkey, node)
  local u = T .. ':u:' .. user
  if redis.call('HDEL', u, 'd' .. device) == 1 then totals('devices', -1) end
  if redis.call('HLEN', u) <= 1 then
    redis.call('DEL', u)
    local rl = T .. ':rl:' .. user
    for _, room in ipairs(redis.call('SMEMBERS', rl)) do redis.call('SREM', T .. ':r:' .. room, user) end
    redis.call('DEL', rl)
  end
end
