-- A fill after a miss: writes the value only while the caller's lease is still held (an
-- invalidation in between deleted it), and with a version, only if not older than the key's.
-- KEYS: key, lease, ver. ARGV: token, value, ttl s, order ('' for none), ver ttl s (0: none),
-- use leases (1/0), use ordering (1/0). Returns 1 if written, 0 if refused.
if ARGV[6] == '1' and not holds(redis.call('GET', KEYS[2]), ARGV[1], now_ms()) then return 0 end
if ARGV[7] == '1' and ARGV[4] ~= '' then
  local cur = redis.call('GET', KEYS[3])
  local cur_newer = cur and newer(cur, ARGV[4])
  if cur_newer then
    -- Older than what the key has seen: this reader will not fill, so it hands its lease back
    -- rather than make the next reader wait for it to lapse.
    if ARGV[6] == '1' then redis.call('DEL', KEYS[2]) end
    return 0
  end
  -- No position yet, or an older one of the same kind: record the fill's. A position of the
  -- other kind (nil: a version attribute being turned on or off) is left for the invalidator's
  -- next change; the lease alone guards this fill, as it does without a version attribute.
  if not cur or cur_newer == false then
    -- A TTL of 0: a position that lives as long as the cache (serverless, see `ops/mod.rs`).
    if ARGV[5] == '0' then
      redis.call('SET', KEYS[3], ARGV[4])
    else
      redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[6] == '1' then redis.call('DEL', KEYS[2]) end
return 1
