-- newer(a, b): is position a ("<kind>:<major>:<minor>") strictly newer than b? nil when the two
-- cannot be compared: different kinds (s = sequence number, v = version attribute), or b written
-- in an older format. Majors are decimal integers of any length (40-digit sequence numbers do
-- not fit a Lua number), so they compare by length first, then as strings. Prepended to
-- fill.lua and apply.lua.
local function newer(a, b)
  local ak, am, an = string.match(a, '^(%a):(%d+):(%d+)$')
  local bk, bm, bn = string.match(b, '^(%a):(%d+):(%d+)$')
  if not ak or not bk or ak ~= bk then return nil end
  if #am ~= #bm then return #am > #bm end
  if am ~= bm then return am > bm end
  return tonumber(an) > tonumber(bn)
end
