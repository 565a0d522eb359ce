-- The previous admission script (a full scan of the usage hash per candidate), kept only as
-- the baseline of the fleet_state benchmark. Not used by Spillway.
--
-- acquire: the first candidate not in backoff and with budget left; its estimate is reserved.
--
-- KEYS[1]  {prefix}:{pool}:pending   hash reservation id -> "<candidate i>|<bucket>|<tokens>"
--          (or "released"), so an abandoned reservation can be released and a settle is
--          applied once
-- then three per candidate i, in preference order (all share the pool's hash tag):
--   KEYS[3i-1]  {prefix}:{pool}:backoff:<backend>  hash until_ms, reason, failures, opened
--   KEYS[3i]    {prefix}:{pool}:usage:<backend>    hash tokens:<bucket_start_ms>, requests:<bucket_start_ms>
--   KEYS[3i+1]  {prefix}:{pool}:hints:<backend>    hash remaining_tokens, utilization, updated_ms,
--                                                  admitted_tokens (running count)
-- ARGV[1]  estimated tokens of the request (whole number >= 0)
-- ARGV[2]  budget bucket length, ms          ARGV[3]  budget window length, ms
-- ARGV[4]  "" to take the time from Redis TIME; a time in ms only in tests
-- ARGV[5]  how long an upstream's capacity hints stay trusted, ms
-- ARGV[6]  circuit breaker probe: after a cool-down one request is admitted and the others
--          are held back this long (ms) while it probes
-- ARGV[7]  the reservation's id ("" none); an id already released admits nothing
-- ARGV[5+3i], ARGV[6+3i], ARGV[7+3i]  candidate i's token and request budget per window,
--          and the utilization (share) above which it is skipped; -1: none
-- Returns {1, i, bucket_start_ms, ledger, now_ms}  candidate i admits; the estimate and one
--                                      request are charged to its bucket starting at
--                                      bucket_start_ms; ledger is its running count of admitted
--                                      tokens; now_ms is the admission time (the breaker epoch)
--         {0, wait_ms, throttled}      none admits; the earliest may in wait_ms; throttled is
--                                      1 when a 429 backoff, a budget or a capacity hint is why
-- Errors  "ERR spillway: ..." on malformed arguments.
--
-- A bucket counts while any part of it is inside the window (start + bucket > now - window),
-- so counted usage never falls below what a sliding window holds. A fresh hint that the
-- upstream is above its spill utilization, or has fewer tokens left than this request needs,
-- skips the candidate before it starts answering 429 (proactive spill-over).
--
-- Probes: after a breaker cool-down, a 429's backoff, or a probe that never reported, the
-- first admission probes alone; the others are held back `probe` ms or until its outcome.

local estimate = tonumber(ARGV[1])
local bucket = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
if estimate == nil or estimate < 0 or estimate ~= math.floor(estimate) then
  return redis.error_reply('ERR spillway: estimated tokens must be a whole number >= 0')
end
if bucket == nil or bucket < 1 or window == nil or window < 1 then
  return redis.error_reply('ERR spillway: bucket and window lengths must be >= 1 ms')
end
if #KEYS < 4 or (#KEYS - 1) % 3 ~= 0 or #ARGV ~= 6 + #KEYS then
  return redis.error_reply('ERR spillway: expected the pending key, then 3 keys and 3 limits per candidate')
end
local pending_key, id = KEYS[1], ARGV[7]
if id ~= '' and redis.call('HEXISTS', pending_key, id) == 1 then
  -- Released before it ran (its caller gave up on it): admit nothing.
  return {0, 0, 0}
end
local hint_ttl = tonumber(ARGV[5]) or 0
local probe = tonumber(ARGV[6]) or 0

local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fits(used_tokens, used_requests, tpm, rpm)
  local tokens_ok = tpm < 0 or used_tokens + estimate <= tpm or used_tokens == 0
  local requests_ok = rpm < 0 or used_requests < rpm
  return tokens_ok and requests_ok
end

local earliest = -1
local throttled = 0

-- What the upstream's last hints say: how long a fresh hint says this candidate has no room
-- (or nil), and whether an expired hint said so (the next request then probes it alone).
local function hinted_full(hints_key, spill)
  local h = redis.call('HMGET', hints_key, 'remaining_tokens', 'utilization', 'updated_ms')
  local updated = tonumber(h[3])
  if updated == nil then return nil, false end
  local remaining, utilization = tonumber(h[1]), tonumber(h[2])
  local full = (remaining ~= nil and remaining < estimate) or (spill >= 0 and utilization ~= nil and utilization >= spill)
  if not full then return nil, false end
  if updated + hint_ttl > now then return math.max(updated + hint_ttl - now, 1), false end
  return nil, true
end

for i = 1, (#KEYS - 1) / 3 do
  local backoff_key, usage_key, hints_key = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local tpm, rpm, spill = tonumber(ARGV[5 + 3 * i]), tonumber(ARGV[6 + 3 * i]), tonumber(ARGV[7 + 3 * i])
  local wait
  local backoff = redis.call('HMGET', backoff_key, 'until_ms', 'reason', 'opened')
  local until_ms = tonumber(backoff[1])
  local full, probe_hint = nil, false
  if until_ms == nil or until_ms <= now then full, probe_hint = hinted_full(hints_key, spill) end
  if until_ms ~= nil and until_ms > now then
    wait = until_ms - now
    if backoff[2] == 'throttled' then throttled = 1 end
  elseif full ~= nil then
    wait = full
    throttled = 1
  else
    -- Usage in the window, dropping buckets that have left it.
    local starts, tokens, requests = {}, {}, {}
    local used_tokens, used_requests = 0, 0
    local raw = redis.call('HGETALL', usage_key)
    for j = 1, #raw, 2 do
      local kind, start = string.match(raw[j], '^(%a+):(%d+)$')
      start = tonumber(start)
      if start ~= nil then
        if start + bucket + window <= now then
          redis.call('HDEL', usage_key, raw[j])
        else
          if tokens[start] == nil then
            tokens[start], requests[start] = 0, 0
            starts[#starts + 1] = start
          end
          local value = tonumber(raw[j + 1]) or 0
          if kind == 'tokens' then
            tokens[start] = value
            used_tokens = used_tokens + value
          elseif kind == 'requests' then
            requests[start] = value
            used_requests = used_requests + value
          end
        end
      end
    end
    if fits(used_tokens, used_requests, tpm, rpm) then
      local start = now - (now % bucket)
      local field = string.format('%d', start)
      redis.call('HINCRBY', usage_key, 'tokens:' .. field, estimate)
      redis.call('HINCRBY', usage_key, 'requests:' .. field, 1)
      redis.call('PEXPIRE', usage_key, 2 * (window + bucket))
      if id ~= '' then
        redis.call('HSET', pending_key, id, string.format('%d|%d|%d', i, start, estimate))
        redis.call('PEXPIRE', pending_key, 2 * (window + bucket))
      end
      -- Hint ledger: requests admitted since the upstream's last answer use up its
      -- remaining tokens, so concurrent requests see the room shrink.
      local h = redis.call('HMGET', hints_key, 'remaining_tokens', 'updated_ms')
      if tonumber(h[1]) ~= nil and tonumber(h[2]) ~= nil and tonumber(h[2]) + hint_ttl > now then
        redis.call('HINCRBY', hints_key, 'remaining_tokens', -estimate)
      end
      local ledger = redis.call('HINCRBY', hints_key, 'admitted_tokens', estimate)
      if redis.call('PTTL', hints_key) < 0 then
        redis.call('PEXPIRE', hints_key, 2 * (window + bucket))
      end
      if probe_hint then
        -- The last hint said "full" and has expired: this request probes; the others keep
        -- treating the hint as fresh until its answer brings a new one.
        redis.call('HSET', hints_key, 'updated_ms', string.format('%d', now))
      end
      if (tonumber(backoff[3]) or 0) > 0 or backoff[2] == 'throttled' or backoff[2] == 'probing' then
        -- Half-open breaker, or a 429's backoff over: this request probes; the others wait
        -- for its outcome.
        redis.call('HSET', backoff_key, 'until_ms', string.format('%d', now + probe), 'reason', 'probing')
        redis.call('PEXPIRE', backoff_key, math.max(redis.call('PTTL', backoff_key), probe))
      end
      return {1, i, start, ledger, now}
    end
    throttled = 1
    table.sort(starts)
    wait = window
    for _, start in ipairs(starts) do
      used_tokens = used_tokens - tokens[start]
      used_requests = used_requests - requests[start]
      if fits(used_tokens, used_requests, tpm, rpm) then
        wait = math.max(start + bucket + window - now, 1)
        break
      end
    end
  end
  if earliest < 0 or wait < earliest then earliest = wait end
end

return {0, math.max(earliest, 0), throttled}
