-- settle: what became of admitted requests, in one round trip; also the backoff operation.
-- Takes any number of records of one pool, applied in order (a replica sends what queued
-- while its previous call was on the wire). Each record is 5 keys (below) and, in ARGV, a
-- kind followed by its arguments:
--   "r" and 25 arguments: one receipt (below);
--   "a" and 17 arguments: the sum of a member's completed requests on a lease:
--     1 token corrections "<bucket>=<used - reserved>,..."  2 histogram "<metric>:le_<b>=<n>,..."
--     3 completed   4 their estimated tokens   5 their actual tokens   6 successes
--     7 latest admission time, ms (breaker epoch)   8 remaining tokens ("" none)
--     9 utilization ("" none)   10 ledger mark of those hints   11 their age, ms
--     12 latency slot, ms   13 latency window, ms   14 clock ("" Redis TIME)
--     15 breaker outcome window, ms   16 their prompt tokens   17 of which cached
-- The first record's clock is the batch's.
--
-- Per receipt record:
-- KEYS[1]  {prefix}:{pool}:backoff:<backend>  hash until_ms, reason, set_ms, failures, opened
-- KEYS[2]  {prefix}:{pool}:usage:<backend>    hash tokens:<bucket_start_ms>, requests:<bucket_start_ms>
-- KEYS[3]  {prefix}:{pool}:latency:<backend>  hash <metric>:<slot_start_ms>:le_<bound ms>|le_inf -> count,
--                                              their sum over the window <metric>:w:le_<bound>,
--                                              slot (the newest slot seen), summed (1)
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
-- ARGV[24] prompt tokens the answer reported   ARGV[25] of which its prompt cache served
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
--
-- Cost: a batch writes each member's counters once, however many receipts it carries. The
-- completed requests of a member are summed (token corrections per bucket, histogram counts,
-- estimated and actual tokens, outcomes for the breaker, the newest hints) and written when
-- the batch ends, or just before a failure of the same member, so a failure still follows
-- the successes sent before it. The whole batch shares one clock reading.

-- Read the records' layout first: a malformed batch changes nothing.
local starts, kinds = {}, {}
do
  local p = 1
  while p <= #ARGV do
    local kind = ARGV[p]
    local length = (kind == 'r' and 25) or (kind == 'a' and 17) or nil
    if length == nil or p + length > #ARGV then
      return redis.error_reply('ERR spillway: settle records are "r" and 25 arguments or "a" and 17')
    end
    starts[#starts + 1], kinds[#kinds + 1] = p, kind
    p = p + length + 1
  end
end
if #starts == 0 or #KEYS ~= 5 * #starts then
  return redis.error_reply('ERR spillway: settle takes 5 keys per record')
end

local now
local first_clock = (kinds[1] == 'r' and ARGV[starts[1] + 13]) or ARGV[starts[1] + 14]
if first_clock ~= '' then
  now = tonumber(first_clock)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local fmt = function(n) return string.format('%d', n) end

-- Count outcomes in the breaker window; returns successes and failures in it.
local function count_outcomes(backoff_key, rate_window, ok, failed)
  local w = redis.call('HMGET', backoff_key, 'rate_start_ms', 'rate_ok', 'rate_failed')
  local start, oks, fails = tonumber(w[1]), tonumber(w[2]) or 0, tonumber(w[3]) or 0
  if start == nil or now >= start + rate_window then
    start, oks, fails = now, 0, 0
  end
  oks, fails = oks + ok, fails + failed
  redis.call('HSET', backoff_key, 'rate_start_ms', fmt(start), 'rate_ok', oks, 'rate_failed', fails)
  return oks, fails
end

-- Whether an outcome of a request admitted at `admitted` predates the breaker's last opening.
local function from_before(backoff_key, admitted)
  local b = redis.call('HMGET', backoff_key, 'opened', 'opened_ms')
  local opened, opened_ms = tonumber(b[1]) or 0, tonumber(b[2]) or 0
  return opened > 0 and admitted < opened_ms, opened
end

-- What a batch has gathered for one member, written by flush().
local members, order = {}, {}
local function member(keys, args)
  local m = members[keys[1]]
  if m == nil then
    m = {keys = keys, args = args, usage = {}, usage_order = {}, histogram = {}, histogram_order = {},
      estimated = 0, actual = 0, prompt = 0, cached = 0, completed = 0, successes = 0, admitted = -1, hints = nil}
    members[keys[1]] = m
    order[#order + 1] = keys[1]
  end
  return m
end

local function flush(m)
  local backoff_key, usage_key, latency_key, hints_key = m.keys[1], m.keys[2], m.keys[3], m.keys[4]
  local slot_length, latency_window = tonumber(m.args[11]), tonumber(m.args[12])
  -- Token corrections, per bucket; a bucket that left the window changes nothing.
  local moved = 0
  for _, field in ipairs(m.usage_order) do
    local before = tonumber(redis.call('HGET', usage_key, field))
    if before ~= nil then
      local after = math.max(before + m.usage[field], 0)
      redis.call('HSET', usage_key, field, after)
      moved = moved + after - before
    end
  end
  -- The running sum (acquire.lua) moves with its buckets.
  if moved ~= 0 and redis.call('HEXISTS', usage_key, 'sum_tokens') == 1 then
    redis.call('HINCRBY', usage_key, 'sum_tokens', moved)
  end
  -- Latency histograms, per slot, and the window's sum of them (`<metric>:w:<bound>`, the
  -- summary snapshot.lua reads): a slot that leaves the window is subtracted from the sum
  -- and dropped when a new slot opens.
  if #m.histogram_order > 0 then
    local slot = fmt(now - (now % slot_length))
    local held = redis.call('HMGET', latency_key, 'slot', 'summed')
    if held[1] ~= slot or held[2] ~= '1' then
      for _, f in ipairs(redis.call('HKEYS', latency_key)) do
        local metric, start, bound = string.match(f, '^([%a_]+):(%d+):(.+)$')
        start = tonumber(start)
        if start ~= nil and start + slot_length + latency_window <= now then
          if held[2] == '1' then
            local count = tonumber(redis.call('HGET', latency_key, f)) or 0
            local sum = metric .. ':w:' .. bound
            if redis.call('HINCRBY', latency_key, sum, fmt(-count)) <= 0 then redis.call('HDEL', latency_key, sum) end
          end
          redis.call('HDEL', latency_key, f)
        elseif start ~= nil and held[2] ~= '1' then
          -- Kept from before the sums existed: counted into them once.
          redis.call('HINCRBY', latency_key, metric .. ':w:' .. bound, tonumber(redis.call('HGET', latency_key, f)) or 0)
        end
      end
      redis.call('HSET', latency_key, 'slot', slot, 'summed', '1')
    end
    for _, label in ipairs(m.histogram_order) do
      local metric, bound = string.match(label, '^([%a_]+):(.*)$')
      redis.call('HINCRBY', latency_key, metric .. ':' .. slot .. ':' .. bound, m.histogram[label])
      redis.call('HINCRBY', latency_key, metric .. ':w:' .. bound, m.histogram[label])
    end
    redis.call('PEXPIRE', latency_key, 2 * (latency_window + slot_length))
  end
  -- Completed requests: their estimates against their usage.
  if m.completed > 0 then
    redis.call('HINCRBY', hints_key, 'estimated_tokens', m.estimated)
    redis.call('HINCRBY', hints_key, 'actual_tokens', m.actual)
    redis.call('HINCRBY', hints_key, 'prompt_tokens', m.prompt)
    redis.call('HINCRBY', hints_key, 'cached_tokens', m.cached)
    redis.call('PEXPIRE', hints_key, 2 * (latency_window + slot_length))
  end
  -- Capacity hints: the newest gathered, unless newer ones are held.
  local h = m.hints
  if h ~= nil then
    local held = tonumber(redis.call('HGET', hints_key, 'updated_ms'))
    if held == nil or h.observed > held then
      if h.remaining ~= nil then
        local remaining = h.remaining
        local admitted = tonumber(redis.call('HGET', hints_key, 'admitted_tokens'))
        if h.mark ~= nil and admitted ~= nil and admitted > h.mark then
          remaining = math.max(remaining - (admitted - h.mark), 0)
        end
        redis.call('HSET', hints_key, 'remaining_tokens', fmt(remaining))
      end
      if h.utilization ~= nil then redis.call('HSET', hints_key, 'utilization', h.utilization) end
      redis.call('HSET', hints_key, 'updated_ms', fmt(h.observed))
      redis.call('PEXPIRE', hints_key, 2 * (latency_window + slot_length))
    end
  end
  -- Completed requests count as successes, close the breaker and end a probe (unless all
  -- of them were admitted before it last opened).
  if m.successes > 0 then
    local rate_window = tonumber(m.args[18]) or 0
    count_outcomes(backoff_key, rate_window, m.successes, 0)
    if redis.call('PTTL', backoff_key) < rate_window then
      redis.call('PEXPIRE', backoff_key, math.max(rate_window, 1))
    end
    if not from_before(backoff_key, m.admitted) then
      redis.call('HSET', backoff_key, 'failures', 0, 'opened', 0)
      redis.call('HDEL', backoff_key, 'opened_ms')
      if redis.call('HGET', backoff_key, 'reason') == 'probing' then
        redis.call('HDEL', backoff_key, 'until_ms', 'reason')
      end
    end
  end
  members[backoff_key] = nil
end

-- A backoff (a failed attempt, or the plain backoff operation), applied at once.
local function back_off(keys, args)
  local backoff_key = keys[1]
  local length, reason = tonumber(args[9]), args[10]
  if length == nil or length < 0 then
    return redis.error_reply('ERR spillway: backoff length must be a number >= 0')
  end
  local threshold, max_cooldown = tonumber(args[14]) or 0, tonumber(args[15]) or 0
  local failure_rate, min_outcomes = tonumber(args[16]) or 2, tonumber(args[17]) or 0
  local rate_window = tonumber(args[18]) or 0
  if threshold > 0 and reason ~= 'throttled' then
    local before, opened = from_before(backoff_key, tonumber(args[20]) or now)
    if before then
      count_outcomes(backoff_key, rate_window, 0, 1)
      length = nil
    else
      local failures = redis.call('HINCRBY', backoff_key, 'failures', 1)
      local oks, fails = count_outcomes(backoff_key, rate_window, 0, 1)
      local rate_exceeded = oks + fails >= min_outcomes and fails >= failure_rate * (oks + fails)
      if failures < threshold and not rate_exceeded and opened == 0 then
        length = nil
      else
        length = math.min(length * math.pow(2, math.min(opened, 20)), math.max(max_cooldown, 1))
        redis.call('HINCRBY', backoff_key, 'opened', 1)
        redis.call('HSET', backoff_key, 'opened_ms', fmt(now))
      end
    end
  end
  if length ~= nil then
    local deadline = now + length
    local current = redis.call('HMGET', backoff_key, 'until_ms', 'reason')
    local until_ms = tonumber(current[1])
    if until_ms == nil or until_ms <= now or deadline >= until_ms or current[2] == 'probing' then
      redis.call('HSET', backoff_key, 'until_ms', fmt(deadline), 'reason', reason, 'set_ms', fmt(now))
    end
  end
  -- The breaker's counts outlive the deadline by the longest cool-down.
  redis.call('PEXPIRE', backoff_key, math.max((length or 0) + max_cooldown, 1))
  return nil
end

local function add_correction(m, field, delta)
  if m.usage[field] == nil then
    m.usage[field] = 0
    m.usage_order[#m.usage_order + 1] = field
  end
  m.usage[field] = m.usage[field] + delta
end

local function add_samples(m, label, n)
  if m.histogram[label] == nil then
    m.histogram[label] = 0
    m.histogram_order[#m.histogram_order + 1] = label
  end
  m.histogram[label] = m.histogram[label] + n
end

local function add_hints(m, observed, remaining, mark, utilization)
  if m.hints == nil or observed > m.hints.observed then
    m.hints = {observed = observed, remaining = remaining, mark = mark, utilization = utilization}
  end
end

-- A sum record: added to its member's gathered state as the receipts it stands for would be.
local function add_sum(keys, a)
  local m = member(keys, {[11] = a[12], [12] = a[13], [18] = a[15]})
  for bucket, delta in string.gmatch(a[1], '(%d+)=(%-?%d+)') do
    add_correction(m, 'tokens:' .. bucket, tonumber(delta))
  end
  for label, n in string.gmatch(a[2], '([%a_]+:le_%w+)=(%d+)') do
    add_samples(m, label, tonumber(n))
  end
  m.completed = m.completed + (tonumber(a[3]) or 0)
  m.estimated = m.estimated + (tonumber(a[4]) or 0)
  m.actual = m.actual + (tonumber(a[5]) or 0)
  m.prompt = m.prompt + (tonumber(a[16]) or 0)
  m.cached = m.cached + (tonumber(a[17]) or 0)
  local successes = tonumber(a[6]) or 0
  if successes > 0 then
    m.successes = m.successes + successes
    m.admitted = math.max(m.admitted, tonumber(a[7]) or now)
  end
  if a[8] ~= '' or a[9] ~= '' then
    add_hints(m, now - (tonumber(a[11]) or 0), tonumber(a[8]), tonumber(a[10]), (a[9] ~= '' and a[9]) or nil)
  end
end

for j = 1, #starts do
  local keys, args = {}, {}
  for k = 1, 5 do keys[k] = KEYS[5 * (j - 1) + k] end
  local length = (kinds[j] == 'r' and 25) or 17
  for a = 1, length do args[a] = ARGV[starts[j] + a] end
  if kinds[j] == 'a' then
    add_sum(keys, args)
  else
    local m = member(keys, args)

    -- Replace the estimate with the real count, once, while the reservation is open.
    local open_reservation = true
    if args[22] ~= '' then
      local entry = redis.call('HGET', keys[5], args[22])
      open_reservation = entry ~= false and entry ~= 'released'
      if open_reservation then redis.call('HDEL', keys[5], args[22]) end
    end
    if args[1] ~= '' and open_reservation then
      local reserved, used = tonumber(args[2]), tonumber(args[3])
      if reserved == nil or used == nil or reserved < 0 or used < 0 then
        return redis.error_reply('ERR spillway: token counts must be numbers >= 0')
      end
      add_correction(m, 'tokens:' .. args[1], used - reserved)
    end

    -- Latency samples; a sample means the request completed.
    local metrics = {{'ttfb_ms', args[4]}, {'total_ms', args[5]}, {'ms_per_output_token', args[6]},
      {'output_tokens', args[23]}}
    local sampled = false
    for _, metric in ipairs(metrics) do
      if metric[2] ~= '' then
        add_samples(m, metric[1] .. ':' .. metric[2], 1)
        sampled = true
      end
    end
    if sampled and args[1] ~= '' then
      m.completed = m.completed + 1
      m.estimated = m.estimated + (tonumber(args[2]) or 0)
      m.actual = m.actual + (tonumber(args[3]) or 0)
      m.prompt = m.prompt + (tonumber(args[24]) or 0)
      m.cached = m.cached + (tonumber(args[25]) or 0)
    end

    -- Capacity hints: keep the newest observation of the batch.
    if args[7] ~= '' or args[8] ~= '' then
      add_hints(m, now - (tonumber(args[21]) or 0), tonumber(args[7]), tonumber(args[19]),
        (args[8] ~= '' and args[8]) or nil)
    end

    if args[9] ~= '' then
      -- A failure follows what was gathered before it.
      flush(m)
      local failed = back_off(keys, args)
      if failed ~= nil then return failed end
    elseif args[4] ~= '' then
      m.successes = m.successes + 1
      m.admitted = math.max(m.admitted, tonumber(args[20]) or now)
    end
  end
end

for _, key in ipairs(order) do
  if members[key] ~= nil then flush(members[key]) end
end
return 1
