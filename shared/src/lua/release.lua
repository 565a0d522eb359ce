-- release: give back a reservation whose caller gave up on it (its acquire timed out on the
-- replica's side but may still have run in Redis). Idempotent; a release that arrives before
-- its acquire leaves a mark that makes the acquire admit nothing.
--
-- KEYS[1]  {prefix}:{pool}:pending   hash reservation id -> "<candidate i>|<bucket>|<tokens>"
-- KEYS[2i], KEYS[2i+1]  {prefix}:{pool}:usage:<backend> and :backoff:<backend> of candidate i,
--          in the acquire's order
-- A released reservation that was a probe (breaker half-open, or after a 429) ends the
-- probe's hold, so the next request probes instead of everyone waiting for an outcome that
-- will never come.
-- ARGV[1]  the reservation's id      ARGV[2]  how long the mark is kept, ms
-- Returns 1 when a reservation was given back, 0 otherwise.
-- Errors  "ERR spillway: ..." on malformed arguments.

local ttl = tonumber(ARGV[2])
if #KEYS < 3 or #KEYS % 2 ~= 1 or #ARGV ~= 2 or ARGV[1] == '' or ttl == nil or ttl < 1 then
  return redis.error_reply('ERR spillway: release takes the pending key, usage keys, an id and a ttl')
end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], 'released')
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
if entry == false or entry == 'released' then return 0 end
local i, bucket, tokens = string.match(entry, '^(%d+)|(%d+)|(%d+)$')
local usage_key, backoff_key = KEYS[2 * tonumber(i or 0)], KEYS[2 * tonumber(i or 0) + 1]
if usage_key == nil or backoff_key == nil then return 0 end
if redis.call('HGET', backoff_key, 'reason') == 'probing' then
  redis.call('HDEL', backoff_key, 'until_ms', 'reason')
end
local function take(field, amount, sum_field)
  local before = tonumber(redis.call('HGET', usage_key, field))
  if before == nil then return end
  local after = math.max(before - amount, 0)
  redis.call('HSET', usage_key, field, after)
  -- The running sum (acquire.lua) moves with its bucket.
  if redis.call('HEXISTS', usage_key, sum_field) == 1 then
    redis.call('HINCRBY', usage_key, sum_field, after - before)
  end
end
take('tokens:' .. bucket, tonumber(tokens), 'sum_tokens')
take('requests:' .. bucket, 1, 'sum_requests')
return 1
