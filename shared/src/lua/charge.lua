-- charge: tokens and requests a replica admitted on its own embedded state (Redis was slow
-- or down), added to the member's current bucket so the fleet counts them from now on.
-- No budget check: they were already served.
--
-- KEYS[1]  {prefix}:{pool}:usage:<backend>   hash tokens:<bucket_start_ms>, requests:<bucket_start_ms>
-- KEYS[2]  {prefix}:{pool}:hints:<backend>   hash admitted_tokens (the hint ledger)
-- ARGV: one record (scripts.rs ChargeArgs)
--   tokens, requests      whole numbers >= 0
--   bucket_ms, window_ms  budget bucket and window lengths
--   clock                 "" to take the time from Redis TIME; a time in ms only in tests
-- Returns 1. Errors "ERR spillway: ..." on malformed arguments.
local CHARGE = fields{'tokens', 'requests', 'bucket_ms', 'window_ms', 'clock'}

local args = read(CHARGE, 1)
local tokens, requests = tonumber(args.tokens), tonumber(args.requests)
local bucket, window = tonumber(args.bucket_ms), tonumber(args.window_ms)
if #KEYS ~= 2 or #ARGV ~= CHARGE.length or tokens == nil or tokens < 0 or requests == nil or requests < 0 then
  return fail('charge takes 2 keys, tokens, requests, bucket, window, clock')
end
if bucket == nil or bucket < 1 or window == nil or window < 1 then
  return fail('bucket and window lengths must be >= 1 ms')
end
local now = clock_ms(args.clock)
add_usage(KEYS[1], KEYS[2], tokens, requests, now, bucket, window)
return 1
