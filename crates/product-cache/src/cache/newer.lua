-- newer(a, b): is position a ("major:minor") strictly newer than b?
-- Majors are decimal integers of any length (40-digit sequence numbers do not fit a Lua
-- number), so they compare by length first, then as strings. Prepended to fill.lua and
-- apply.lua.
local function newer(a, b)
  local am, an = string.match(a, '^(%d+):(%d+)$')
  local bm, bn = string.match(b, '^(%d+):(%d+)$')
  if not bm then return true end
  if #am ~= #bm then return #am > #bm end
  if am ~= bm then return am > bm end
  return tonumber(an) > tonumber(bn)
end
