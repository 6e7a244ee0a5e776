-- remove: ARGV = tag, then groups of (user, device, count, ids...). Ids no longer queued are
-- skipped. Returns how many entries were removed.
local i, removed = 2, 0
while i <= #ARGV do
  local dkey = dk(ARGV[i], ARGV[i + 1])
  local count = tonumber(ARGV[i + 2])
  local ids = {}
  for j = i + 3, i + 2 + count do table.insert(ids, ARGV[j]) end
  removed = removed + remove_entries(dkey, ids)
  i = i + 3 + count
end
return removed
