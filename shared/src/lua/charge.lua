-- charge: tokens and requests a replica admitted on its own embedded state (Redis was slow
-- or down), added to the member's current bucket so the fleet counts them from now on.
-- No budget check: they were already served.
--
-- KEYS[1]  {prefix}:{pool}:usage:<backend>   hash tokens:<bucket_start_ms>, requests:<bucket_start_ms>
-- KEYS[2]  {prefix}:{pool}:hints:<backend>   hash admitted_tokens (the hint ledger)
-- ARGV[1]  tokens (whole number >= 0)   ARGV[2]  requests (whole number >= 0)
-- ARGV[3]  budget bucket length, ms     ARGV[4]  budget window length, ms
-- ARGV[5]  "" to take the time from Redis TIME; a time in ms only in tests
-- Returns 1. Errors "ERR spillway: ..." on malformed arguments.

local tokens, requests = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket, window = tonumber(ARGV[3]), tonumber(ARGV[4])
if #KEYS ~= 2 or #ARGV ~= 5 or tokens == nil or tokens < 0 or requests == nil or requests < 0 then
  return redis.error_reply('ERR spillway: charge takes 2 keys, tokens, requests, bucket, window, clock')
end
if bucket == nil or bucket < 1 or window == nil or window < 1 then
  return redis.error_reply('ERR spillway: bucket and window lengths must be >= 1 ms')
end
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local field = string.format('%d', now - (now % bucket))
redis.call('HINCRBY', KEYS[1], 'tokens:' .. field, tokens)
redis.call('HINCRBY', KEYS[1], 'requests:' .. field, requests)
-- The running sums (acquire.lua), when kept, move with the bucket.
if redis.call('HEXISTS', KEYS[1], 'sum_tokens') == 1 then
  redis.call('HINCRBY', KEYS[1], 'sum_tokens', tokens)
  redis.call('HINCRBY', KEYS[1], 'sum_requests', requests)
  redis.call('HSET', KEYS[1], 'newest', field)
  if redis.call('HEXISTS', KEYS[1], 'oldest') == 0 then redis.call('HSET', KEYS[1], 'oldest', field) end
end
redis.call('PEXPIRE', KEYS[1], 2 * (window + bucket))
redis.call('HINCRBY', KEYS[2], 'admitted_tokens', tokens)
return 1
