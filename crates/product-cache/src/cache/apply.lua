-- One invalidation: skip it if not newer than the key's position, else cancel the lease,
-- delete or set the document, and record the position.
-- KEYS: key, lease, ver. ARGV: 'set' or 'del', value, ttl s, order ('' for none), ver ttl s,
-- use ordering (1/0), the record's creation time less the clock margin (epoch ms, '' if
-- unknown). Returns 1 if applied, 0 if older than what the key has seen.
--
-- A write from a record created before this Redis started is applied as a delete: a restart
-- (or a node replaced empty) forgot the positions, so the record may be a replay older than
-- changes already acknowledged. A delete is right whatever it is; records created after the
-- start are ordered by the positions this Redis has seen, all of them.
local ordered = ARGV[6] == '1' and ARGV[4] ~= ''
local kind = ARGV[1]
if ordered then
  local cur = redis.call('GET', KEYS[3])
  if cur and not newer(ARGV[4], cur) then return 0 end
  if kind == 'set' then
    local info = redis.call('INFO', 'server')
    local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
    local started = (tonumber(redis.call('TIME')[1]) - uptime) * 1000
    local created = tonumber(ARGV[7])
    if not created or created < started then kind = 'del' end
  end
end
redis.call('DEL', KEYS[2])
if kind == 'set' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
if ordered then redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5]) end
return 1
