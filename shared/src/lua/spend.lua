-- spend: add what requests used to an hour's cost ledger (tokens by consumer, pool, class,
-- member and tier; money is computed from them by `spillway cost` with the price table).
--
-- KEYS[1]  {prefix}:spend:{<hour_start_ms>}   hash  "<what>|<pool>|<class>|<backend>|<tier>|<consumer>"
--          -> a whole number; <what> is input, cached, output or requests
-- ARGV: a SPEND record, then an ENTRY record per ledger line (scripts.rs SpendArgs, SpendEntry)
--   spend: expires_at_ms    when the hour is forgotten (unix ms)
--   entry: line             "<pool>|<class>|<backend>|<tier>|<consumer>"
--          input, cached, output, requests   whole numbers >= 0 to add
local SPEND = fields{'expires_at_ms'}
local ENTRY = fields{'line', 'input', 'cached', 'output', 'requests'}

local args = read(SPEND, 1)
local expires_at = tonumber(args.expires_at_ms)
if #KEYS ~= 1 or expires_at == nil or (#ARGV - SPEND.length) % ENTRY.length ~= 0 then
  return fail('spend takes 1 key, an expiry (unix ms) and whole ledger entries')
end
for at = SPEND.length + 1, #ARGV, ENTRY.length do
  local entry = read(ENTRY, at)
  for _, what in ipairs({'input', 'cached', 'output', 'requests'}) do
    local n = tonumber(entry[what])
    if n == nil or n < 0 or n ~= math.floor(n) then
      return fail('ledger counts must be whole numbers >= 0')
    end
    if n > 0 then redis.call('HINCRBY', KEYS[1], what .. '|' .. entry.line, fmt(n)) end
  end
end
redis.call('PEXPIREAT', KEYS[1], fmt(expires_at))
return 1
