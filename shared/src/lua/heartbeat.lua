-- heartbeat: this replica is alive; how many replicas are?
--
-- KEYS[1]  {prefix}:replicas   sorted set: replica id -> time of its last heartbeat (ms)
-- ARGV: one record (scripts.rs HeartbeatArgs)
--   replica  this replica's id
--   ttl_ms   a replica counts as live this long after its last heartbeat
--   clock    "" to take the time from Redis TIME; a time in ms only in tests
-- Returns the number of live replicas, this one included.
-- Errors  "ERR spillway: ..." on malformed arguments.
--
-- Degraded replicas divide what the fleet had left by this count, so N replicas deciding
-- alone never admit more than the fleet as a whole could.

local HEARTBEAT = fields{'replica', 'ttl_ms', 'clock'}

local args = read(HEARTBEAT, 1)
local ttl = tonumber(args.ttl_ms)
if #KEYS ~= 1 or #ARGV ~= HEARTBEAT.length or args.replica == '' or ttl == nil or ttl < 1 then
  return fail('heartbeat takes 1 key, a replica id, a ttl and a clock')
end
local now = clock_ms(args.clock)
redis.call('ZADD', KEYS[1], now, args.replica)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return redis.call('ZCARD', KEYS[1])
