-- preamble: prepended to every script when it is loaded (scripts.rs), so each reads its
-- arguments by name and the time the same way.

-- A record's field names in ARGV order. scripts.rs declares the same names in the same order
-- (`scripts::tests` fails when a script and its record disagree).
local function fields(names)
  return {names = names, length = #names}
end

-- The record `layout` whose first argument is ARGV[at], as a table by field name.
local function read(layout, at)
  local record = {}
  for i, name in ipairs(layout.names) do record[name] = ARGV[at + i - 1] end
  return record
end

-- The time in ms: `pinned` when a test pinned the clock, else Redis TIME (time belongs to
-- the store, never to a replica).
local function clock_ms(pinned)
  if pinned ~= nil and pinned ~= '' then return tonumber(pinned) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n) return string.format('%d', n) end

local function fail(message) return redis.error_reply('ERR spillway: ' .. message) end


-- Add usage a replica already served to a member's current budget bucket (charge.lua,
-- restore.lua): the bucket, the running sums acquire.lua keeps when it keeps them, the
-- key's lifetime, and the hint ledger.
local function add_usage(usage_key, hints_key, tokens, requests, now, bucket, window)
  local field = fmt(now - (now % bucket))
  redis.call('HINCRBY', usage_key, 'tokens:' .. field, tokens)
  redis.call('HINCRBY', usage_key, 'requests:' .. field, requests)
  if redis.call('HEXISTS', usage_key, 'sum_tokens') == 1 then
    redis.call('HINCRBY', usage_key, 'sum_tokens', tokens)
    redis.call('HINCRBY', usage_key, 'sum_requests', requests)
    redis.call('HSET', usage_key, 'newest', field)
    if redis.call('HEXISTS', usage_key, 'oldest') == 0 then redis.call('HSET', usage_key, 'oldest', field) end
  end
  redis.call('PEXPIRE', usage_key, 2 * (window + bucket))
  redis.call('HINCRBY', hints_key, 'admitted_tokens', tokens)
end
