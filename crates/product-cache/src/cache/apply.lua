-- One key's change (a batch's records of the key, collapsed by the invalidator): skip it if not
-- newer than the key's position, else cancel the lease, delete or set the document, and record
-- the position.
-- KEYS: key, lease, ver, the slot's epoch key.
-- ARGV: 'set' or 'del', value, ttl s, order ('' for none), ver ttl s, use ordering (1/0), the
-- record's creation time less the clock margin (epoch ms, '' if unknown), delete even if refused
-- (1/0), now (epoch ms, the invalidator's clock).
-- Returns 1 if applied, 0 if older than what the key has seen.
--
-- A write from a record created before the slot's epoch is applied as a delete. The epoch key is
-- set the first time a write reaches a slot whose data is new (a restart, FLUSHALL, a replica
-- promoted empty: the epoch key went with the positions), so such a record may be a replay older
-- than changes acknowledged before the loss, and a delete is right whatever it is. Records
-- created after the epoch are ordered by positions this data has seen, all of them.
local ordered = ARGV[6] == '1' and ARGV[4] ~= ''
local kind = ARGV[1]
if ordered then
  local cur = redis.call('GET', KEYS[3])
  local is_newer = cur and newer(ARGV[4], cur)
  if is_newer == false and cur then
    if ARGV[8] == '1' then redis.call('DEL', KEYS[1], KEYS[2]) end
    return 0
  end
  -- A position of the other kind (a version attribute turned on or off, or the functions
  -- disagreeing during a rollout): this change cannot be ordered against it, so it deletes,
  -- which is right whatever it is, and its position replaces the other.
  if cur and is_newer == nil then kind = 'del' end
  if kind == 'set' then
    -- SET NX GET (Redis 7): the epoch, written now if this slot has none.
    local epoch = redis.call('SET', KEYS[4], ARGV[9], 'NX', 'GET') or ARGV[9]
    local created = tonumber(ARGV[7])
    if not created or created < tonumber(epoch) then kind = 'del' end
  end
end
if kind == 'set' then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
if ordered then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5]) end
return 1
