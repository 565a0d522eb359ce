-- Remember which pool member holds a stored Responses API object (fleet-wide affinity:
-- only the Azure resource that created a response knows its id), and which consumer made it
-- (only that consumer may use it: every consumer reaches Azure with the same credential).
-- KEYS[1] = <prefix>:response:<id>
-- ARGV[1] = pool, ARGV[2] = backend, ARGV[3] = time to keep it (ms),
-- ARGV[4] = the consumer's tag ('' when the gateway authenticates no one)
redis.call('HSET', KEYS[1], 'pool', ARGV[1], 'backend', ARGV[2], 'consumer', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
