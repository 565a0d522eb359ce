-- release: give back a reservation whose caller gave up on it (its acquire timed out on the
-- replica's side but may still have run in Redis). Idempotent; a release that arrives before
-- its acquire leaves a mark that makes the acquire admit nothing.
--
-- KEYS[1]  {prefix}:{pool}:pending   hash reservation id -> "<candidate i>|<bucket>|<tokens>"
-- KEYS[1+i]  {prefix}:{pool}:usage:<backend> of candidate i, in the acquire's order
-- ARGV[1]  the reservation's id      ARGV[2]  how long the mark is kept, ms
-- Returns 1 when a reservation was given back, 0 otherwise.
-- Errors  "ERR spillway: ..." on malformed arguments.

local ttl = tonumber(ARGV[2])
if #KEYS < 2 or #ARGV ~= 2 or ARGV[1] == '' or ttl == nil or ttl < 1 then
  return redis.error_reply('ERR spillway: release takes the pending key, usage keys, an id and a ttl')
end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], 'released')
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
if entry == false or entry == 'released' then return 0 end
local i, bucket, tokens = string.match(entry, '^(%d+)|(%d+)|(%d+)$')
local usage_key = KEYS[1 + tonumber(i or 0)]
if usage_key == nil then return 0 end
local field = 'tokens:' .. bucket
if redis.call('HEXISTS', usage_key, field) == 1 then
  if redis.call('HINCRBY', usage_key, field, -tonumber(tokens)) < 0 then
    redis.call('HSET', usage_key, field, 0)
  end
  if redis.call('HINCRBY', usage_key, 'requests:' .. bucket, -1) < 0 then
    redis.call('HSET', usage_key, 'requests:' .. bucket, 0)
  end
end
return 1
