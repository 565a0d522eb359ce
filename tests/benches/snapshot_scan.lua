-- The snapshot script before the window sums (kept as the benchmark baseline).
-- snapshot: everything a router or operator needs about some pool members, read-only.
--
-- KEYS, four per member i: backoff, usage, latency, hints keys (as in settle.lua)
-- ARGV[1]  budget bucket length, ms   ARGV[2]  budget window, ms
-- ARGV[3]  latency slot length, ms    ARGV[4]  latency window, ms
-- ARGV[5]  "" to take the time from Redis TIME; a time in ms only in tests
-- Returns one entry per member:
--   {backoff_remaining_ms (0: none), reason, tokens_used, requests_used,
--    remaining_tokens ("": none), utilization ("": none), {field, count, field, count, ...},
--    estimated_tokens, actual_tokens}
-- where the last list holds the latency histogram fields of slots still in the window.

if #KEYS == 0 or #KEYS % 4 ~= 0 or #ARGV ~= 5 then
  return redis.error_reply('ERR spillway: snapshot takes 4 keys per member and 5 arguments')
end
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local bucket, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot_length, latency_window = tonumber(ARGV[3]), tonumber(ARGV[4])

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
  local raw = redis.call('HGETALL', usage_key)
  for j = 1, #raw, 2 do
    local kind, start = string.match(raw[j], '^(%a+):(%d+)$')
    start = tonumber(start)
    if start ~= nil and start + bucket + window > now then
      if kind == 'tokens' then tokens = tokens + tonumber(raw[j + 1]) end
      if kind == 'requests' then requests = requests + tonumber(raw[j + 1]) end
    end
  end

  local hints = redis.call('HMGET', hints_key, 'remaining_tokens', 'utilization', 'estimated_tokens', 'actual_tokens')

  local latency = {}
  local fields = redis.call('HGETALL', latency_key)
  for j = 1, #fields, 2 do
    local start = tonumber(string.match(fields[j], '^[%a_]+:(%d+):'))
    if start ~= nil and start + slot_length + latency_window > now then
      latency[#latency + 1] = fields[j]
      latency[#latency + 1] = fields[j + 1]
    end
  end

  out[i] = {remaining, reason, tokens, requests, hints[1] or '', hints[2] or '', latency,
    tonumber(hints[3]) or 0, tonumber(hints[4]) or 0}
end
return out
