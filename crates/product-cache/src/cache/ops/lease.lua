-- Leases, shared by the scripts that take, check or hand one back. A lease's value is
-- `<expiry ms, the node's clock>:<token>`, and its key lives LEASE_KEY_TTL (26 hours): past
-- the documents' hour and the positions' 25 hours, so a full node's volatile-ttl evicts a
-- lease after everything else of the product's. With the expiry in a PX TTL instead, leases
-- were the nearest expiry on the node and the first keys evicted, and an evicted lease let a
-- herd of waiters each take one and read the table (the lapse is still refused: see
-- `holds`). A lease written by an earlier release (the bare token, with a PX TTL) still
-- counts as held until Redis expires it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Is `lease` (a value, or false) held by anyone as of `now`?
local function held(lease, now)
  if not lease then return false end
  local expiry = string.match(lease, '^(%d+):')
  return expiry == nil or tonumber(expiry) > now
end
-- Is `lease` held by `token`, unlapsed?
local function holds(lease, token, now)
  if not lease then return false end
  local expiry, owner = string.match(lease, '^(%d+):(.*)$')
  return owner == token and tonumber(expiry) > now
end
