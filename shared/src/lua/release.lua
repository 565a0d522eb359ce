-- release: give back a reservation whose caller gave up on it (its acquire timed out on the
-- replica's side but may still have run in Redis). Idempotent; a release that arrives before
-- its acquire leaves a mark that makes the acquire admit nothing.
--
-- Also how a replica gives back the unused part of a lease (`part`).
--
-- KEYS[1]  {prefix}:{pool}:pending   hash reservation id -> "<candidate i>|<bucket>|<tokens>|<requests>"
-- KEYS[2i], KEYS[2i+1]  {prefix}:{pool}:usage:<backend> and :backoff:<backend> of candidate i,
--          in the acquire's order; with a part, just the leased member's two keys
-- A released reservation that was a probe (breaker half-open, or after a 429) ends the
-- probe's hold, so the next request probes instead of everyone waiting for an outcome that
-- will never come.
-- ARGV: one record (scripts.rs ReleaseArgs)
--   reservation_id  the reservation's id      ttl_ms  how long the mark is kept
--   part            "<tokens>|<requests>": give back only this much of it (a lease's unused
--                   part); "" all of it
-- Returns 1 when a reservation was given back, 0 otherwise.
-- Errors  "ERR spillway: ..." on malformed arguments.
local RELEASE = fields{'reservation_id', 'ttl_ms', 'part'}

local args = read(RELEASE, 1)
local ttl = tonumber(args.ttl_ms)
if #KEYS < 3 or #KEYS % 2 ~= 1 or #ARGV ~= RELEASE.length or args.reservation_id == '' or ttl == nil or ttl < 1 then
  return fail('release takes the pending key, usage keys, an id, a ttl and an amount')
end
local part_tokens, part_requests
if args.part ~= '' then
  part_tokens, part_requests = string.match(args.part, '^(%d+)|(%d+)$')
  if part_tokens == nil then
    return fail('the amount given back must read <tokens>|<requests>')
  end
end
local entry = redis.call('HGET', KEYS[1], args.reservation_id)
redis.call('HSET', KEYS[1], args.reservation_id, 'released')
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
if entry == false or entry == 'released' then return 0 end
local i, bucket, tokens, requests = string.match(entry, '^(%d+)|(%d+)|(%d+)|?(%d*)$')
if part_tokens ~= nil then i = 1 end
local usage_key, backoff_key = KEYS[2 * tonumber(i or 0)], KEYS[2 * tonumber(i or 0) + 1]
if usage_key == nil or backoff_key == nil then return 0 end
tokens, requests = tonumber(tokens), tonumber(requests) or 1
if requests == 1 and part_tokens == nil and redis.call('HGET', backoff_key, 'reason') == 'probing' then
  -- A single admission may have been the probe (a lease never is).
  redis.call('HDEL', backoff_key, 'until_ms', 'reason')
end
if part_tokens ~= nil then
  tokens, requests = math.min(tokens, tonumber(part_tokens)), math.min(requests, tonumber(part_requests))
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
take('tokens:' .. bucket, tokens, 'sum_tokens')
take('requests:' .. bucket, requests, 'sum_requests')
return 1
