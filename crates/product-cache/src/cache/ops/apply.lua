-- A batch's changes to one group of keys (one hash slot on a cluster): each key's records,
-- collapsed by the invalidator to one change, in one call, so the node pays the script's fixed
-- cost once per group instead of once per key.
-- KEYS: per change 4: key, lease, ver, the slot's epoch key; then, per 'set' change in order,
-- the key its new document was staged in.
-- ARGV: use ordering (1/0), now (epoch ms, the invalidator's clock), ver ttl s (0: none), watch evictions
-- (1/0); then per change 5: 'set' or 'del', ttl s, order ('' for none), the record's creation time less the clock
-- margin (epoch ms, '' if unknown), delete even if refused (1/0).
-- Returns {refused, blind}: the 0-based indexes of the changes refused as older than what their
-- key has seen (empty, the usual case, when every change was applied), and 1 when the node's
-- eviction count could not be read (see below), else 0.
--
-- A new document does not pass through the script: the same pipeline has just written it (with
-- its TTL) to its staged key, which the script moves into place (RENAME moves the value without
-- copying it) or deletes. Copying kilobytes into Lua and back out cost Redis three times what
-- writing them did.
--
-- Each change: skip it if not newer than the key's position, else cancel the lease, delete or
-- set the document, and record the position. A write from a record created before the slot's
-- epoch is applied as a delete. The epoch, `<ms>:<evicted_keys>`, says since when the
-- positions this slot holds are complete, and it is set to now whenever that stopped being
-- true:
-- - the slot has none: its data is new (a restart, FLUSHALL, a replica promoted empty: the
--   epoch key went with the positions);
-- - the node has evicted keys since the epoch was set (INFO's `evicted_keys` moved): a full
--   node evicts positions too (volatile-ttl samples a few keys and drops the nearest expiry,
--   sometimes a position whose document stays), and a key whose position is gone cannot tell
--   a redelivered older change from a newer one.
-- A record created before the epoch may then be a replay older than a change whose position
-- was forgotten, and a delete is right whatever it is. A record created after it is newer than
-- every change applied before it, and changes applied since have their positions (an eviction
-- since would have moved the count). So while a node evicts, refreshes there delete; when it
-- stops, they refresh again a couple of seconds later (`CLOCK_MARGIN_MS`). An epoch ending in
-- `?` (`declare_empty`, a Redis known to have started empty) takes the count it first meets.
local use_ordering = ARGV[1] == '1'
local now = ARGV[2]
local ver_ttl = tonumber(ARGV[3])
local watch_evictions = ARGV[4] == '1'
local refused_at = {}
local changes = (#ARGV - 4) / 5
-- The node's eviction count, asked once per call and only if a write needs it: once per call,
-- not per key (on a cluster a call is a hash slot's keys, often one; see BENCHMARKS.md,
-- `eviction-guard`). `BLIND` when it cannot be read: a user whose ACL refuses `INFO`, or an
-- `INFO` without `evicted_keys`. The guard then cannot tell whether positions were evicted, and
-- fails safe: every refresh of the call is applied as a delete (right whatever the record is),
-- the epoch is left as it is, and the reply says so, for the invalidator to count and log. A
-- script error instead would fail every refresh batch until Lambda gave its records up.
local BLIND = 'blind'
local evicted = nil
local function evictions()
  if not evicted then
    evicted = '-'
    if watch_evictions then
      local info = redis.pcall('INFO', 'stats')
      if type(info) ~= 'string' then
        evicted = BLIND
      else
        -- A plain find, then a match anchored where it ends: an unanchored pattern over the
        -- 1.3 KB reply cost the script about a third more.
        local _, at = string.find(info, 'evicted_keys:', 1, true)
        evicted = at and string.match(info, '^%d+', at + 1) or BLIND
      end
    end
  end
  return evicted
end
-- Since when `epoch_key`'s slot has kept every position, recording it now where it cannot say.
-- Asked once per slot per call: on a cluster every change of a call is in one slot.
local epochs = {}
local function epoch_of(epoch_key)
  if epochs[epoch_key] then return epochs[epoch_key] end
  local epoch = redis.call('GET', epoch_key)
  local since, seen
  if epoch then since, seen = string.match(epoch, '^(%d+):(.*)$') end
  local count = evictions()
  if count == BLIND then
    -- Nothing vouches for this slot's positions: every record counts as older than the epoch.
    epochs[epoch_key] = now
    return now
  end
  if not (since and seen == count) then
    -- `?`: declared empty, takes the count it meets. Otherwise none, an earlier release's
    -- (no count), or evictions since: a new epoch.
    if not (since and seen == '?') then since = now end
    redis.call('SET', epoch_key, since .. ':' .. count)
  end
  epochs[epoch_key] = since
  return since
end
local staged_keys = 0
for i = 0, changes - 1 do
  local key, lease, ver, epoch_key = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  local a = 4 + 5 * i
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
    local cur
    if ver_ttl == 0 then
      -- No TTL: a position that lives as long as the cache (serverless, see `ops/mod.rs`).
      cur = redis.call('SET', ver, order, 'GET')
    else
      cur = redis.call('SET', ver, order, 'EX', math.max(ver_ttl, tonumber(ttl)), 'GET')
    end
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
      local since = epoch_of(epoch_key)
      if created == '' or tonumber(created) < tonumber(since) or evicted == BLIND then
        kind = 'del'
      end
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
return {refused_at, evicted == BLIND and 1 or 0}
