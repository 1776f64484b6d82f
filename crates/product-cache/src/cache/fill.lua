-- A fill after a miss: writes the value only while the caller's lease is still held (an
-- invalidation in between deleted it), and with a version, only if not older than the key's.
-- KEYS: key, lease, ver. ARGV: token, value, ttl s, order ('' for none), ver ttl s,
-- use leases (1/0), use ordering (1/0). Returns 1 if written, 0 if refused.
if ARGV[6] == '1' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[7] == '1' and ARGV[4] ~= '' then
  local cur = redis.call('GET', KEYS[3])
  if cur and cur ~= ARGV[4] and newer(cur, ARGV[4]) then return 0 end
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[6] == '1' then redis.call('DEL', KEYS[2]) end
return 1
