-- The read path's probe: the cached value, or the key's lease on a miss, atomically.
-- KEYS: key, lease. ARGV: token, lease ms, use leases (1/0), lease key ttl s.
-- Returns {1, value} on a hit, {2, nil} when this reader holds the lease (it took it now, or
-- it is its own already: a probe sent again after its reply was lost finds the lease its first
-- run took), {3, nil} when another reader holds it.
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if ARGV[3] == '0' then return {2, false} end
local now = now_ms()
local lease = redis.call('GET', KEYS[2])
if holds(lease, ARGV[1], now) then return {2, false} end
if held(lease, now) then return {3, false} end
redis.call('SET', KEYS[2], (now + tonumber(ARGV[2])) .. ':' .. ARGV[1], 'EX', ARGV[4])
return {2, false}
