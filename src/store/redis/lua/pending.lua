-- pending (reads only): ARGV = tag, user, device.
return read_queue(dk(ARGV[2], ARGV[3]), {})
