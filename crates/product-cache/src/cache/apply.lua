-- A batch's changes to one group of keys (one hash slot on a cluster): each key's records,
-- collapsed by the invalidator to one change, in one call, so the node pays the script's fixed
-- cost once per group instead of once per key.
-- KEYS: per change 4: key, lease, ver, the slot's epoch key; then, per 'set' change in order,
-- the key its new document was staged in.
-- ARGV: use ordering (1/0), now (epoch ms, the invalidator's clock), ver ttl s; then per change
-- 5: 'set' or 'del', ttl s, order ('' for none), the record's creation time less the clock
-- margin (epoch ms, '' if unknown), delete even if refused (1/0).
-- Returns the 0-based indexes of the changes refused as older than what their key has seen
-- (empty, the usual case, when every change was applied).
--
-- A new document does not pass through the script: the same pipeline has just written it (with
-- its TTL) to its staged key, which the script moves into place (RENAME moves the value without
-- copying it) or deletes. Copying kilobytes into Lua and back out cost Redis three times what
-- writing them did.
--
-- Each change: skip it if not newer than the key's position, else cancel the lease, delete or
-- set the document, and record the position. A write from a record created before the slot's
-- epoch is applied as a delete. The epoch key is set the first time a write reaches a slot
-- whose data is new (a restart, FLUSHALL, a replica promoted empty: the epoch key went with
-- the positions), so such a record may be a replay older than changes acknowledged before the
-- loss, and a delete is right whatever it is. Records created after the epoch are ordered by
-- positions this data has seen, all of them.
local use_ordering = ARGV[1] == '1'
local now = ARGV[2]
local ver_ttl = tonumber(ARGV[3])
local refused_at = {}
local changes = (#ARGV - 3) / 5
local staged_keys = 0
for i = 0, changes - 1 do
  local key, lease, ver, epoch_key = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  local a = 3 + 5 * i
  local kind, ttl, order = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local created, delete_if_refused = ARGV[a + 4], ARGV[a + 5] == '1'
  -- Taken before `kind` may turn into a delete below: a staged document always goes.
  local staged = false
  if kind == 'set' then
    staged_keys = staged_keys + 1
    staged = KEYS[4 * changes + staged_keys]
  end
  local ordered = use_ordering and order ~= ''
  local refused = false
  if ordered then
    -- Recorded now, read back at once: one call where a GET and a SET would be two. A refused
    -- change puts the newer position back (keeping the new TTL, which only lengthens it).
    local cur = redis.call('SET', ver, order, 'EX', math.max(ver_ttl, tonumber(ttl)), 'GET')
    local is_newer = cur and newer(order, cur)
    if cur and is_newer == false then
      refused = true
      redis.call('SET', ver, cur, 'KEEPTTL')
    -- A position of the other kind (a version attribute turned on or off, or the functions
    -- disagreeing during a rollout): this change cannot be ordered against it, so it deletes,
    -- which is right whatever it is, and its position replaces the other.
    elseif cur and is_newer == nil then
      kind = 'del'
    end
    if not refused and kind == 'set' then
      -- SET NX GET (Redis 7): the epoch, written now if this slot has none.
      local epoch = redis.call('SET', epoch_key, now, 'NX', 'GET') or now
      if created == '' or tonumber(created) < tonumber(epoch) then kind = 'del' end
    end
  end
  if refused then
    refused_at[#refused_at + 1] = i
    if delete_if_refused then redis.call('DEL', key, lease) end
    if staged then redis.call('DEL', staged) end
  else
    if kind == 'set' then
      redis.call('DEL', lease)
      -- The staged document is missing only if something removed it (eviction under memory
      -- pressure): the change then deletes, which is right whatever it was.
      if redis.pcall('RENAME', staged, key).err then redis.call('DEL', key) end
    elseif staged then
      redis.call('DEL', key, lease, staged)
    else
      redis.call('DEL', key, lease)
    end
  end
end
return refused_at
