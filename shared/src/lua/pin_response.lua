-- Remember which pool member holds a stored Responses API object (fleet-wide affinity:
-- only the Azure resource that created a response knows its id), and which consumer made it
-- (only that consumer may use it: every consumer reaches Azure with the same credential).
-- KEYS[1]  <prefix>:response:<id>
-- ARGV: one record (scripts.rs PinArgs)
--   pool, backend  the member holding it     ttl_ms  how long to keep it
--   consumer       the creator's tag ('' when the gateway authenticates no one)
local PIN = fields{'pool', 'backend', 'ttl_ms', 'consumer'}

local args = read(PIN, 1)
if #KEYS ~= 1 or #ARGV ~= PIN.length or tonumber(args.ttl_ms) == nil then
  return fail('pin_response takes 1 key, a pool, a backend, a ttl and a consumer tag')
end
redis.call('HSET', KEYS[1], 'pool', args.pool, 'backend', args.backend, 'consumer', args.consumer)
redis.call('PEXPIRE', KEYS[1], args.ttl_ms)
return 1
