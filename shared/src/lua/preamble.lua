-- preamble: prepended to every script when it is loaded (scripts.rs), so each reads its
-- arguments by name and the time the same way.

-- A record's field names in ARGV order. scripts.rs declares the same names in the same order
-- (`scripts::tests` fails when a script and its record disagree).
local function fields(names)
  return {names = names, length = #names}
end

-- The record `layout` whose first argument is ARGV[at], as a table by field name.
local function read(layout, at)
  local record = {}
  for i, name in ipairs(layout.names) do record[name] = ARGV[at + i - 1] end
  return record
end

-- The time in ms: `pinned` when a test pinned the clock, else Redis TIME (time belongs to
-- the store, never to a replica).
local function clock_ms(pinned)
  if pinned ~= nil and pinned ~= '' then return tonumber(pinned) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n) return string.format('%d', n) end

local function fail(message) return redis.error_reply('ERR spillway: ' .. message) end

