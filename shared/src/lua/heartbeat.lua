-- heartbeat: this replica is alive; how many replicas are?
--
-- KEYS[1]  {prefix}:replicas   sorted set: replica id -> time of its last heartbeat (ms)
-- ARGV[1]  this replica's id
-- ARGV[2]  a replica counts as live this long after its last heartbeat, ms
-- ARGV[3]  "" to take the time from Redis TIME; a time in ms only in tests
-- Returns the number of live replicas, this one included.
-- Errors  "ERR spillway: ..." on malformed arguments.
--
-- Degraded replicas divide what the fleet had left by this count, so N replicas deciding
-- alone never admit more than the fleet as a whole could.

local ttl = tonumber(ARGV[2])
if #KEYS ~= 1 or #ARGV ~= 3 or ARGV[1] == '' or ttl == nil or ttl < 1 then
  return redis.error_reply('ERR spillway: heartbeat takes 1 key, a replica id, a ttl and a clock')
end
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return redis.call('ZCARD', KEYS[1])
