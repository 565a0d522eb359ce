-- settle: what became of admitted requests, in one round trip; also the backoff operation.
-- Takes any number of records of one pool, applied in order (a replica sends what queued
-- while its previous call was on the wire). Each record is 5 keys (below) and, in ARGV, a
-- kind followed by its fields (scripts.rs ReceiptRecord and SumRecord, same names):
--   "r" and a RECEIPT: one receipt (below);
--   "a" and a SUM: the sum of a member's completed requests on a lease: token `corrections`
--     "<bucket>=<used - reserved>,...", `histogram` "<metric>:le_<b>=<n>,...", how many
--     `completed`, their `estimated`, `actual`, `prompt_tokens` and `cached_tokens`, their
--     `successes` and latest `admitted_ms` (breaker epoch), the newest hints
--     (`remaining_tokens`, `utilization`, "" none) with their `ledger_mark` and `hints_age_ms`,
--     and the windows as in a receipt.
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
-- RECEIPT fields:
--   bucket_ms        reservation bucket start, ms ("" when settling no reservation)
--   reserved, used   tokens reserved and really used
--   ttfb_label, total_label, per_token_label, output_tokens_label  histogram labels
--                    (`le_<bound>`) for ttfb_ms, total_ms, ms_per_output_token, output_tokens
--                    ("" to record none)
--   remaining_tokens x-ratelimit-remaining-tokens ("" none)   utilization  share ("" none)
--   backoff_ms       backoff length, ms ("" none)             backoff_reason
--   slot_ms, latency_window_ms  latency slot length and window, ms
--   clock            "" to take the time from Redis TIME; a time in ms only in tests
--   breaker_failures consecutive failures that open the breaker (0: a plain backoff)
--   breaker_max_ms   longest breaker cool-down
--   breaker_failure_rate  failure share that also opens it, with at least
--                    breaker_min_outcomes outcomes within breaker_window_ms (fields
--                    rate_start_ms, rate_ok, rate_failed)
--   ledger_mark      the reservation's ledger mark ("" none): remaining_tokens is stored less
--                    the tokens admitted after this request, which the upstream had not seen
--   admitted_ms      when the request was admitted ("" now): the breaker epoch
--   hints_age_ms     how long ago the hints were observed: hints are kept only when observed
--                    after the ones held (updated_ms is the observation time)
--   reservation_id   "" none: its usage is corrected only while it is open, so a settle
--                    applies once, and never after a release
--   prompt_tokens, cached_tokens  prompt tokens the answer reported, of which its cache served
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

local RECEIPT = fields{'bucket_ms', 'reserved', 'used', 'ttfb_label', 'total_label',
  'per_token_label', 'remaining_tokens', 'utilization', 'backoff_ms', 'backoff_reason', 'slot_ms',
  'latency_window_ms', 'clock', 'breaker_failures', 'breaker_max_ms', 'breaker_failure_rate',
  'breaker_min_outcomes', 'breaker_window_ms', 'ledger_mark', 'admitted_ms', 'hints_age_ms',
  'reservation_id', 'output_tokens_label', 'prompt_tokens', 'cached_tokens'}
local SUM = fields{'corrections', 'histogram', 'completed', 'estimated', 'actual', 'successes',
  'admitted_ms', 'remaining_tokens', 'utilization', 'ledger_mark', 'hints_age_ms', 'slot_ms',
  'latency_window_ms', 'clock', 'breaker_window_ms', 'prompt_tokens', 'cached_tokens'}
local LAYOUTS = {r = RECEIPT, a = SUM}

-- Read the records first: a malformed batch changes nothing.
local records, kinds = {}, {}
do
  local p = 1
  while p <= #ARGV do
    local kind = ARGV[p]
    local layout = LAYOUTS[kind]
    if layout == nil or p + layout.length > #ARGV then
      return fail('settle records are "r" and a RECEIPT or "a" and a SUM (scripts.rs)')
    end
    records[#records + 1], kinds[#kinds + 1] = read(layout, p + 1), kind
    p = p + layout.length + 1
  end
end
if #records == 0 or #KEYS ~= 5 * #records then
  return fail('settle takes 5 keys per record')
end

-- The first record's clock is the batch's.
local now = clock_ms(records[1].clock)

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
  local slot_length, latency_window = tonumber(m.args.slot_ms), tonumber(m.args.latency_window_ms)
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
    local rate_window = tonumber(m.args.breaker_window_ms) or 0
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
  local length, reason = tonumber(args.backoff_ms), args.backoff_reason
  if length == nil or length < 0 then
    return fail('backoff length must be a number >= 0')
  end
  local threshold, max_cooldown = tonumber(args.breaker_failures) or 0, tonumber(args.breaker_max_ms) or 0
  local failure_rate, min_outcomes = tonumber(args.breaker_failure_rate) or 2, tonumber(args.breaker_min_outcomes) or 0
  local rate_window = tonumber(args.breaker_window_ms) or 0
  if threshold > 0 and reason ~= 'throttled' then
    local before, opened = from_before(backoff_key, tonumber(args.admitted_ms) or now)
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
  local m = member(keys, a)
  for bucket, delta in string.gmatch(a.corrections, '(%d+)=(%-?%d+)') do
    add_correction(m, 'tokens:' .. bucket, tonumber(delta))
  end
  for label, n in string.gmatch(a.histogram, '([%a_]+:le_%w+)=(%d+)') do
    add_samples(m, label, tonumber(n))
  end
  m.completed = m.completed + (tonumber(a.completed) or 0)
  m.estimated = m.estimated + (tonumber(a.estimated) or 0)
  m.actual = m.actual + (tonumber(a.actual) or 0)
  m.prompt = m.prompt + (tonumber(a.prompt_tokens) or 0)
  m.cached = m.cached + (tonumber(a.cached_tokens) or 0)
  local successes = tonumber(a.successes) or 0
  if successes > 0 then
    m.successes = m.successes + successes
    m.admitted = math.max(m.admitted, tonumber(a.admitted_ms) or now)
  end
  if a.remaining_tokens ~= '' or a.utilization ~= '' then
    add_hints(m, now - (tonumber(a.hints_age_ms) or 0), tonumber(a.remaining_tokens),
      tonumber(a.ledger_mark), (a.utilization ~= '' and a.utilization) or nil)
  end
end

for j = 1, #records do
  local keys, args = {}, records[j]
  for k = 1, 5 do keys[k] = KEYS[5 * (j - 1) + k] end
  if kinds[j] == 'a' then
    add_sum(keys, args)
  else
    local m = member(keys, args)

    -- Replace the estimate with the real count, once, while the reservation is open.
    local open_reservation = true
    if args.reservation_id ~= '' then
      local entry = redis.call('HGET', keys[5], args.reservation_id)
      open_reservation = entry ~= false and entry ~= 'released'
      if open_reservation then redis.call('HDEL', keys[5], args.reservation_id) end
    end
    if args.bucket_ms ~= '' and open_reservation then
      local reserved, used = tonumber(args.reserved), tonumber(args.used)
      if reserved == nil or used == nil or reserved < 0 or used < 0 then
        return fail('token counts must be numbers >= 0')
      end
      add_correction(m, 'tokens:' .. args.bucket_ms, used - reserved)
    end

    -- Latency samples; a sample means the request completed.
    local metrics = {{'ttfb_ms', args.ttfb_label}, {'total_ms', args.total_label},
      {'ms_per_output_token', args.per_token_label}, {'output_tokens', args.output_tokens_label}}
    local sampled = false
    for _, metric in ipairs(metrics) do
      if metric[2] ~= '' then
        add_samples(m, metric[1] .. ':' .. metric[2], 1)
        sampled = true
      end
    end
    if sampled and args.bucket_ms ~= '' then
      m.completed = m.completed + 1
      m.estimated = m.estimated + (tonumber(args.reserved) or 0)
      m.actual = m.actual + (tonumber(args.used) or 0)
      m.prompt = m.prompt + (tonumber(args.prompt_tokens) or 0)
      m.cached = m.cached + (tonumber(args.cached_tokens) or 0)
    end

    -- Capacity hints: keep the newest observation of the batch.
    if args.remaining_tokens ~= '' or args.utilization ~= '' then
      add_hints(m, now - (tonumber(args.hints_age_ms) or 0), tonumber(args.remaining_tokens),
        tonumber(args.ledger_mark), (args.utilization ~= '' and args.utilization) or nil)
    end

    if args.backoff_ms ~= '' then
      -- A failure follows what was gathered before it.
      flush(m)
      local failed = back_off(keys, args)
      if failed ~= nil then return failed end
    elseif args.ttfb_label ~= '' then
      m.successes = m.successes + 1
      m.admitted = math.max(m.admitted, tonumber(args.admitted_ms) or now)
    end
  end
end

for _, key in ipairs(order) do
  if members[key] ~= nil then flush(members[key]) end
end
return 1
