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

-- What removals take from the counts, written once at the end of the script by `flush` (which
-- the script's wrapper calls, see ../mod.rs): a `_batch` ack removes a hundred entries, and one
-- HINCRBY per entry and count cost as much as the removal itself.
local taken = {messages = 0, bytes = 0, queues = {}}

local function flush()
  totals('queued_messages', -taken.messages)
  totals('queued_bytes', -taken.bytes)
  for dkey, size in pairs(taken.queues) do
    if size ~= 0 then redis.call('HINCRBY', T .. ':qb', dkey, -size) end
  end
end

-- The bookkeeping of a removed queue entry (value `v`): a shared message loses a reference (and
-- goes with the last), the counts lose its size. Returns its size and event.
local function release(dkey, id, v)
  local flag, size, _, event = parse(v)
  if flag == 's' and redis.call('HINCRBY', T .. ':n', id, -1) <= 0 then
    redis.call('HDEL', T .. ':n', id)
    redis.call('HDEL', T .. ':b', id)
  end
  taken.queues[dkey] = (taken.queues[dkey] or 0) + size
  taken.messages = taken.messages + 1
  taken.bytes = taken.bytes + size
  return size, event
end

-- Removes one queue entry; returns its size, or nil if it was not queued.
local function remove_entry(dkey, id)
  local qv = T .. ':qv:' .. dkey
  local v = redis.call('HGET', qv, id)
  if not v then return nil end
  local size, event = release(dkey, id, v)
  redis.call('HDEL', qv, id)
  redis.call('ZREM', T .. ':q:' .. dkey, id)
  redis.call('ZREM', T .. ':e:' .. dkey .. event, id)
  return size
end

-- At most this many arguments to one command from a script (Lua's `unpack` has a limit).
local CHUNK = 1000

-- Removes the entries `ids` (each once) of one device's queue, with a few commands per chunk of
-- them rather than several per entry. Returns how many were queued.
local function remove_entries(dkey, ids)
  local qv, q = T .. ':qv:' .. dkey, T .. ':q:' .. dkey
  local seen, count = {}, 0
  for from = 1, #ids, CHUNK do
    local chunk = {}
    for n = from, math.min(from + CHUNK - 1, #ids) do
      if not seen[ids[n]] then
        seen[ids[n]] = true
        table.insert(chunk, ids[n])
      end
    end
    local found, by_event = {}, {}
    if #chunk > 0 then
      for n, v in ipairs(redis.call('HMGET', qv, unpack(chunk))) do
        if v then
          local id = chunk[n]
          local _, event = release(dkey, id, v)
          table.insert(found, id)
          by_event[event] = by_event[event] or {}
          table.insert(by_event[event], id)
        end
      end
    end
    if #found > 0 then
      redis.call('HDEL', qv, unpack(found))
      redis.call('ZREM', q, unpack(found))
      for event, of_event in pairs(by_event) do redis.call('ZREM', T .. ':e:' .. dkey .. event, unpack(of_event)) end
      count = count + #found
    end
  end
  return count
end

-- A device's queue, oldest first, as id, queued-at, entry triples.
local function read_queue(dkey, out)
  local qv = T .. ':qv:' .. dkey
  local ids = redis.call('ZRANGE', T .. ':q:' .. dkey, 0, -1)
  for from = 1, #ids, CHUNK do
    local chunk = {unpack(ids, from, math.min(from + CHUNK - 1, #ids))}
    for n, v in ipairs(redis.call('HMGET', qv, unpack(chunk))) do
      local flag, _, at, _, entry = parse(v)
      if flag == 's' then entry = redis.call('HGET', T .. ':b', chunk[n]) end
      table.insert(out, chunk[n])
      table.insert(out, at)
      table.insert(out, entry)
    end
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
  remove_entries(dkey, redis.call('ZRANGE', T .. ':q:' .. dkey, 0, -1))
  redis.call('HDEL', T .. ':qb', dkey)
  taken.queues[dkey] = nil
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
