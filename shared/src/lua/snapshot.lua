#!lua flags=no-writes
-- snapshot: everything a router or operator needs about some pool members, read-only.
--
-- KEYS, four per member i: backoff, usage, latency, hints keys (as in settle.lua)
-- ARGV: one record (scripts.rs SnapshotArgs)
--   bucket_ms, window_ms          budget bucket length and window
--   slot_ms, latency_window_ms    latency slot length and window
--   clock                         "" to take the time from Redis TIME; a time in ms only in tests
-- Returns one entry per member:
--   {backoff_remaining_ms (0: none), reason, tokens_used, requests_used,
--    remaining_tokens ("": none), utilization ("": none), {field, count, field, count, ...},
--    estimated_tokens, actual_tokens, prompt_tokens, cached_tokens}
-- where the last list holds the latency histograms summed over the window, as
-- <metric>:w:le_<bound> fields (kept by settle.lua).
--
-- Constant cost per member, whatever the window's resolution: usage comes from the running
-- sums (acquire.lua), less the few buckets that left the window since they were last moved;
-- latency from the window's sums (a fixed set of fields). The sums are exact as of the last
-- settle: a member nobody settled on for a while still shows the slots that have since aged
-- out, until a whole latency window has passed without any (then it shows none).

local SNAPSHOT = fields{'bucket_ms', 'window_ms', 'slot_ms', 'latency_window_ms', 'clock'}

if #KEYS == 0 or #KEYS % 4 ~= 0 or #ARGV ~= SNAPSHOT.length then
  return fail('snapshot takes 4 keys per member and 5 arguments')
end
local args = read(SNAPSHOT, 1)
local now = clock_ms(args.clock)
local bucket, window = tonumber(args.bucket_ms), tonumber(args.window_ms)
local slot_length, latency_window = tonumber(args.slot_ms), tonumber(args.latency_window_ms)

-- The window's latency sums: every metric at every bucket bound (see store.rs).
local summary_fields = {}
for _, metric in ipairs({'ttfb_ms', 'total_ms', 'ms_per_output_token', 'output_tokens'}) do
  for b = 0, 16 do summary_fields[#summary_fields + 1] = metric .. ':w:le_' .. fmt(2 ^ b) end
  summary_fields[#summary_fields + 1] = metric .. ':w:le_inf'
end

local out = {}
for i = 1, #KEYS / 4 do
  local backoff_key, usage_key, latency_key, hints_key = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]

  local backoff = redis.call('HMGET', backoff_key, 'until_ms', 'reason')
  local remaining, reason = 0, ''
  local until_ms = tonumber(backoff[1])
  if until_ms ~= nil and until_ms > now then
    remaining, reason = until_ms - now, backoff[2] or ''
  end

  local tokens, requests = 0, 0
  local u = redis.call('HMGET', usage_key, 'sum_tokens', 'sum_requests', 'oldest', 'newest', 'bucket_ms')
  local oldest, newest = tonumber(u[3]), tonumber(u[4])
  if tonumber(u[5]) == bucket and u[1] and u[2] then
    tokens, requests = tonumber(u[1]), tonumber(u[2])
    if newest ~= nil and newest + bucket + window <= now then
      tokens, requests = 0, 0
    else
      while oldest ~= nil and newest ~= nil and oldest <= newest and oldest + bucket + window <= now do
        local v = redis.call('HMGET', usage_key, 'tokens:' .. fmt(oldest), 'requests:' .. fmt(oldest))
        tokens = tokens - (tonumber(v[1]) or 0)
        requests = requests - (tonumber(v[2]) or 0)
        oldest = oldest + bucket
      end
    end
  else
    -- No running sums yet (written before they existed, or another bucket length): count.
    local raw = redis.call('HGETALL', usage_key)
    for j = 1, #raw, 2 do
      local kind, start = string.match(raw[j], '^(%a+):(%d+)$')
      start = tonumber(start)
      if start ~= nil and start + bucket + window > now then
        if kind == 'tokens' then tokens = tokens + tonumber(raw[j + 1]) end
        if kind == 'requests' then requests = requests + tonumber(raw[j + 1]) end
      end
    end
  end
  tokens, requests = math.max(tokens, 0), math.max(requests, 0)

  local hints = redis.call('HMGET', hints_key, 'remaining_tokens', 'utilization', 'estimated_tokens',
    'actual_tokens', 'prompt_tokens', 'cached_tokens')

  local latency = {}
  local held = redis.call('HMGET', latency_key, 'slot', 'summed')
  local newest_slot = tonumber(held[1])
  if held[2] == '1' and newest_slot ~= nil and newest_slot + slot_length + latency_window > now then
    local counts = redis.call('HMGET', latency_key, unpack(summary_fields))
    for j = 1, #summary_fields do
      if counts[j] then
        latency[#latency + 1] = summary_fields[j]
        latency[#latency + 1] = counts[j]
      end
    end
  end

  out[i] = {remaining, reason, tokens, requests, hints[1] or '', hints[2] or '', latency,
    tonumber(hints[3]) or 0, tonumber(hints[4]) or 0, tonumber(hints[5]) or 0, tonumber(hints[6]) or 0}
end
return out
