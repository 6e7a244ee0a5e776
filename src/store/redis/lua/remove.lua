-- remove: ARGV = tag, then groups of (user, device, count, ids...). Ids no longer queued are
-- skipped. Returns how many entries were removed.
local i, removed = 2, 0
while i <= #ARGV do
  local dkey = dk(ARGV[i], ARGV[i + 1])
  local count = tonumber(ARGV[i + 2])
  for j = i + 3, i + 2 + count do
    if remove_entry(dkey, ARGV[j]) then removed = removed + 1 end
  end
  i = i + 3 + count
end
return removed
