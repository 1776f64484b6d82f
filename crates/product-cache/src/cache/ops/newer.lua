-- newer(a, b): is position a strictly newer than b? nil when the two cannot be compared:
-- different kinds (S = sequence number, V = version attribute), or b written in an older
-- format (lowercase kinds). A position is `<kind><length of major, 2 digits>:<major>:<minor>`,
-- so two of one kind compare as plain strings: by length, then digit by digit (a 40-digit
-- sequence number does not fit a Lua number), then by minor. Prepended to the scripts that
-- compare positions.
local function newer(a, b)
  if string.byte(a, 1) ~= string.byte(b, 1) then return nil end
  return a > b
end
