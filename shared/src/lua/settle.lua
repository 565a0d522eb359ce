-- settle: what became of an admitted request, in one round trip; also the backoff operation.
--
-- KEYS[1]  {prefix}:{pool}:backoff:<backend>  hash until_ms, reason, set_ms, failures, opened
-- KEYS[2]  {prefix}:{pool}:usage:<backend>    hash tokens:<bucket_start_ms>, requests:<bucket_start_ms>
-- KEYS[3]  {prefix}:{pool}:latency:<backend>  hash <metric>:<slot_start_ms>:le_<bound ms>|le_inf -> count,
--                                              and slot (the newest slot seen)
-- KEYS[4]  {prefix}:{pool}:hints:<backend>    hash remaining_tokens, utilization, updated_ms,
--                                              estimated_tokens, actual_tokens (completed requests)
-- KEYS[5]  {prefix}:{pool}:pending              hash of open reservations (see acquire.lua)
-- ARGV[1]  reservation bucket start, ms ("" when settling no reservation)
-- ARGV[2]  tokens reserved   ARGV[3]  tokens really used
-- ARGV[4..6]  histogram labels for ttfb_ms, total_ms, ms_per_output_token ("" to record none)
-- ARGV[7]  x-ratelimit-remaining-tokens ("" none)   ARGV[8]  utilization share ("" none)
-- ARGV[9]  backoff length, ms ("" none)             ARGV[10] backoff reason
-- ARGV[11] latency slot length, ms                  ARGV[12] latency window, ms
-- ARGV[13] "" to take the time from Redis TIME; a time in ms only in tests
-- ARGV[14] circuit breaker: consecutive failures that open it (0: a plain backoff, no breaker)
-- ARGV[15] longest breaker cool-down, ms
-- ARGV[16] failure share that also opens it   ARGV[17] ... with at least this many outcomes
-- ARGV[18] ... within this window, ms (fields rate_start_ms, rate_ok, rate_failed)
-- ARGV[19] the reservation's ledger mark ("" none): remaining_tokens is stored less the
--          tokens admitted after this request, which the upstream had not seen
-- ARGV[20] when the request was admitted, ms ("" now): the breaker epoch
-- ARGV[21] how long ago the hints in ARGV[7..8] were observed, ms ("" 0): hints are kept
--          only when observed after the ones held (updated_ms is the observation time)
-- ARGV[22] the reservation's id ("" none): its usage is corrected only while it is open, so a
--          settle applies once, and never after a release
-- ARGV[23] histogram label for the request's output tokens ("" none), metric output_tokens
-- Returns 1. Errors "ERR spillway: ..." on malformed arguments.
--
-- Breaker: a failure that is not throttling counts toward `failures`; at the threshold the
-- member is held back for the given length doubled per consecutive opening (`opened`),
-- capped, and `opened_ms` marks the epoch. While open, a failure of a request admitted since
-- (the probe) always reopens it; outcomes of requests admitted before it opened neither
-- reopen nor close it. A completed request admitted since resets both and ends a probe.
--
-- A reservation whose bucket has left the window (or never existed) changes nothing: its
-- charge already expired with the bucket.

if #KEYS ~= 5 or #ARGV ~= 23 then
  return redis.error_reply('ERR spillway: settle takes 5 keys and 23 arguments')
end
local threshold, max_cooldown = tonumber(ARGV[14]) or 0, tonumber(ARGV[15]) or 0
local failure_rate, min_outcomes, rate_window = tonumber(ARGV[16]) or 2, tonumber(ARGV[17]) or 0, tonumber(ARGV[18]) or 0
local now
if ARGV[13] ~= '' then
  now = tonumber(ARGV[13])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local backoff_key, usage_key, latency_key, hints_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local admitted = tonumber(ARGV[20]) or now
local breaker = redis.call('HMGET', backoff_key, 'opened', 'opened_ms')
local opened, opened_ms = tonumber(breaker[1]) or 0, tonumber(breaker[2]) or 0
-- The outcome of a request admitted before the breaker last opened.
local from_before = opened > 0 and admitted < opened_ms

-- Count an outcome in the breaker window; returns successes and failures in it.
local function count_outcome(ok)
  local w = redis.call('HMGET', backoff_key, 'rate_start_ms', 'rate_ok', 'rate_failed')
  local start, oks, fails = tonumber(w[1]), tonumber(w[2]) or 0, tonumber(w[3]) or 0
  if start == nil or now >= start + rate_window then
    start, oks, fails = now, 0, 0
  end
  if ok then oks = oks + 1 else fails = fails + 1 end
  redis.call('HSET', backoff_key, 'rate_start_ms', string.format('%d', start), 'rate_ok', oks, 'rate_failed', fails)
  return oks, fails
end

-- Replace the estimate with the real count, once, while the reservation is open.
local open_reservation = true
if ARGV[22] ~= '' then
  local entry = redis.call('HGET', KEYS[5], ARGV[22])
  open_reservation = entry ~= false and entry ~= 'released'
  if open_reservation then redis.call('HDEL', KEYS[5], ARGV[22]) end
end
if ARGV[1] ~= '' and open_reservation then
  local reserved, used = tonumber(ARGV[2]), tonumber(ARGV[3])
  if reserved == nil or used == nil or reserved < 0 or used < 0 then
    return redis.error_reply('ERR spillway: token counts must be numbers >= 0')
  end
  local field = 'tokens:' .. ARGV[1]
  local before = tonumber(redis.call('HGET', usage_key, field))
  if before ~= nil then
    local after = math.max(before + used - reserved, 0)
    redis.call('HSET', usage_key, field, after)
    -- The running sum (acquire.lua) moves with its bucket.
    if redis.call('HEXISTS', usage_key, 'sum_tokens') == 1 then
      redis.call('HINCRBY', usage_key, 'sum_tokens', after - before)
    end
  end
end

-- Latency histograms, per slot; slots older than the window are dropped when a new one opens.
local slot_length, latency_window = tonumber(ARGV[11]), tonumber(ARGV[12])
if ARGV[4] ~= '' or ARGV[5] ~= '' or ARGV[6] ~= '' or ARGV[23] ~= '' then
  local slot = string.format('%d', now - (now % slot_length))
  if redis.call('HGET', latency_key, 'slot') ~= slot then
    local fields = redis.call('HKEYS', latency_key)
    for _, f in ipairs(fields) do
      local start = tonumber(string.match(f, '^[%a_]+:(%d+):'))
      if start ~= nil and start + slot_length + latency_window <= now then
        redis.call('HDEL', latency_key, f)
      end
    end
    redis.call('HSET', latency_key, 'slot', slot)
  end
  local metrics = {{'ttfb_ms', ARGV[4]}, {'total_ms', ARGV[5]}, {'ms_per_output_token', ARGV[6]},
    {'output_tokens', ARGV[23]}}
  for _, m in ipairs(metrics) do
    if m[2] ~= '' then
      redis.call('HINCRBY', latency_key, m[1] .. ':' .. slot .. ':' .. m[2], 1)
    end
  end
  redis.call('PEXPIRE', latency_key, 2 * (latency_window + slot_length))
  -- A latency sample means the request completed: count its estimate against its usage.
  if ARGV[1] ~= '' then
    redis.call('HINCRBY', hints_key, 'estimated_tokens', tonumber(ARGV[2]))
    redis.call('HINCRBY', hints_key, 'actual_tokens', tonumber(ARGV[3]))
    redis.call('PEXPIRE', hints_key, 2 * (latency_window + slot_length))
  end
end

-- Capacity hints from the upstream's answer, unless newer ones are held.
local observed = now - (tonumber(ARGV[21]) or 0)
local held = tonumber(redis.call('HGET', hints_key, 'updated_ms'))
if (ARGV[7] ~= '' or ARGV[8] ~= '') and (held == nil or observed > held) then
  if ARGV[7] ~= '' then
    local remaining = tonumber(ARGV[7])
    local mark = tonumber(ARGV[19])
    local admitted = tonumber(redis.call('HGET', hints_key, 'admitted_tokens'))
    if mark ~= nil and admitted ~= nil and admitted > mark then
      remaining = math.max(remaining - (admitted - mark), 0)
    end
    redis.call('HSET', hints_key, 'remaining_tokens', string.format('%d', remaining))
  end
  if ARGV[8] ~= '' then redis.call('HSET', hints_key, 'utilization', ARGV[8]) end
  redis.call('HSET', hints_key, 'updated_ms', string.format('%d', observed))
  redis.call('PEXPIRE', hints_key, 2 * (latency_window + slot_length))
end

-- Backoff: the deadline becomes max(current, now + length); a failed probe always reopens.
if ARGV[9] ~= '' then
  local length, reason = tonumber(ARGV[9]), ARGV[10]
  if length == nil or length < 0 then
    return redis.error_reply('ERR spillway: backoff length must be a number >= 0')
  end
  if threshold > 0 and reason ~= 'throttled' then
    if from_before then
      count_outcome(false)
      length = nil
    else
      local failures = redis.call('HINCRBY', backoff_key, 'failures', 1)
      local oks, fails = count_outcome(false)
      local rate_exceeded = oks + fails >= min_outcomes and fails >= failure_rate * (oks + fails)
      if failures < threshold and not rate_exceeded and opened == 0 then
        length = nil
      else
        length = math.min(length * math.pow(2, math.min(opened, 20)), math.max(max_cooldown, 1))
        redis.call('HINCRBY', backoff_key, 'opened', 1)
        redis.call('HSET', backoff_key, 'opened_ms', string.format('%d', now))
      end
    end
  end
  if length ~= nil then
    local deadline = now + length
    local current = redis.call('HMGET', backoff_key, 'until_ms', 'reason')
    local until_ms = tonumber(current[1])
    if until_ms == nil or until_ms <= now or deadline >= until_ms or current[2] == 'probing' then
      redis.call('HSET', backoff_key, 'until_ms', string.format('%d', deadline), 'reason', reason,
        'set_ms', string.format('%d', now))
    end
  end
  -- The breaker's counts outlive the deadline by the longest cool-down.
  redis.call('PEXPIRE', backoff_key, math.max((length or 0) + max_cooldown, 1))
elseif ARGV[4] ~= '' then
  -- A completed request counts as a success, closes the breaker and ends a probe.
  count_outcome(true)
  if redis.call('PTTL', backoff_key) < rate_window then
    redis.call('PEXPIRE', backoff_key, math.max(rate_window, 1))
  end
  if not from_before then
    redis.call('HSET', backoff_key, 'failures', 0, 'opened', 0)
    redis.call('HDEL', backoff_key, 'opened_ms')
    if redis.call('HGET', backoff_key, 'reason') == 'probing' then
      redis.call('HDEL', backoff_key, 'until_ms', 'reason')
    end
  end
end

return 1
