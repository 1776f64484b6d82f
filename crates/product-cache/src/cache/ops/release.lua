-- Hands a lease back: deletes it only if it is still the caller's (it may have lapsed and been
-- taken by another reader, whose lease must stay).
-- KEYS: lease. ARGV: token. Returns 1 if released, 0 if the lease was not the caller's.
if holds(redis.call('GET', KEYS[1]), ARGV[1], now_ms()) then return redis.call('DEL', KEYS[1]) end
return 0
