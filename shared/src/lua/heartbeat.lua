-- heartbeat: this replica is alive; how many replicas are?
--
-- KEYS[1]  {prefix}:replicas                  sorted set: replica id -> time of its last heartbeat (ms)
-- KEYS[2]  {{prefix}:replicas}:round_trips    hash: replica id -> its round trip to Redis (us)
-- ARGV: one record (scripts.rs HeartbeatArgs)
--   replica  this replica's id
--   ttl_ms   a replica counts as live this long after its last heartbeat
--   round_trip_us  this replica's typical round trip to Redis ("" not measured yet)
--   clock    "" to take the time from Redis TIME; a time in ms only in tests
-- Returns the number of live replicas, this one included.
-- Errors  "ERR spillway: ..." on malformed arguments.
--
-- Degraded replicas divide what the fleet had left by this count, so N replicas deciding
-- alone never admit more than the fleet as a whole could.

local HEARTBEAT = fields{'replica', 'ttl_ms', 'round_trip_us', 'clock'}

local args = read(HEARTBEAT, 1)
local ttl = tonumber(args.ttl_ms)
if #KEYS ~= 2 or #ARGV ~= HEARTBEAT.length or args.replica == '' or ttl == nil or ttl < 1 then
  return fail('heartbeat takes 2 keys, a replica id, a ttl, a round trip and a clock')
end
local now = clock_ms(args.clock)
redis.call('ZADD', KEYS[1], now, args.replica)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
for _, replica in ipairs(gone) do redis.call('HDEL', KEYS[2], replica) end
if tonumber(args.round_trip_us) ~= nil then
  redis.call('HSET', KEYS[2], args.replica, args.round_trip_us)
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
redis.call('PEXPIRE', KEYS[2], 2 * ttl)
return redis.call('ZCARD', KEYS[1])
