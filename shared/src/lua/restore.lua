-- restore: put a pool's usage back after Redis lost it (restarted empty, failed over to an
-- empty node), once: the replica that claims the pool's generation marker adds what its
-- last shared view counted, in the same step. A call whose answer was lost and is made
-- again finds the marker set and writes nothing, so the usage is restored exactly once.
--
-- KEYS[1]                 {prefix}:{pool}:generation   string: the generation in force
-- KEYS[2i], KEYS[2i+1]    member i's usage and hints keys (as in charge.lua)
-- ARGV: a RESTORE record, then a USAGE record per member (scripts.rs RestoreArgs, UsageArgs)
--   generation            the value to set the marker to when it is missing
--   bucket_ms, window_ms  budget bucket and window lengths
--   clock                 "" to take the time from Redis TIME; a time in ms only in tests
--   tokens, requests      a member's usage to put back, whole numbers >= 0
-- Returns the generation in force: `generation` when this call set the marker (and restored),
-- the marker's value when it was already set (nothing written).
-- Errors "ERR spillway: ..." on malformed arguments.
local RESTORE = fields{'generation', 'bucket_ms', 'window_ms', 'clock'}
local USAGE = fields{'tokens', 'requests'}

local members = (#KEYS - 1) / 2
if #KEYS < 1 or members ~= math.floor(members) or #ARGV ~= RESTORE.length + members * USAGE.length then
  return fail('restore takes the generation key, 2 keys per member, a RESTORE record and a USAGE record per member')
end
local args = read(RESTORE, 1)
local bucket, window = tonumber(args.bucket_ms), tonumber(args.window_ms)
if args.generation == '' or bucket == nil or bucket < 1 or window == nil or window < 1 then
  return fail('restore takes a generation and bucket and window lengths >= 1 ms')
end
local usage = {}
for i = 1, members do
  local u = read(USAGE, RESTORE.length + USAGE.length * (i - 1) + 1)
  local tokens, requests = tonumber(u.tokens), tonumber(u.requests)
  if tokens == nil or tokens < 0 or requests == nil or requests < 0 then
    return fail('usage must be whole numbers >= 0')
  end
  usage[i] = {tokens, requests}
end

local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], args.generation)
local now = clock_ms(args.clock)
for i = 1, members do
  add_usage(KEYS[2 * i], KEYS[2 * i + 1], usage[i][1], usage[i][2], now, bucket, window)
end
return args.generation
