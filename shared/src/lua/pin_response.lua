-- Remember which pool member holds a stored Responses API object (fleet-wide affinity:
-- only the Azure resource that created a response knows its id).
-- KEYS[1] = <prefix>:response:<id>
-- ARGV[1] = pool, ARGV[2] = backend, ARGV[3] = time to keep it (ms)
redis.call('HSET', KEYS[1], 'pool', ARGV[1], 'backend', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
