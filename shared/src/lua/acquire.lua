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
-- then, for a request waiting in turn (FleetState::acquire_in_turn), two more:
--   {prefix}:{pool}:queue    sorted set  ticket id, scored by arrival (oldest first)
--   {prefix}:{pool}:tickets  hash        ticket id -> "<estimate>|<alive until ms>";
--                                        '#next' -> the arrival counter
-- ARGV: an ACQUIRE record, a CANDIDATE record per candidate (in the keys' order), a LEASE
-- record, and with the queue keys a QUEUE record (scripts.rs AcquireArgs, CandidateArgs,
-- LeaseArgs, QueueArgs):
--   estimate             estimated tokens of the request (whole number >= 0)
--   bucket_ms, window_ms budget bucket and window lengths
--   clock                "" to take the time from Redis TIME; a time in ms only in tests
--   hint_ttl_ms          how long an upstream's capacity hints stay trusted
--   probe_ms             circuit breaker probe: after a cool-down one request is admitted and
--                        the others are held back this long while it probes
--   reservation_id       "" none; an id already released admits nothing
--   candidate: tokens_per_window, requests_per_window, and the utilization (share) above
--              which it is skipped, spill_utilization; -1: none. ceiling: a lower traffic
--              class's line: admitted only while the window's tokens, this request's
--              included, stay at or below it (no exception for an empty window, and never
--              a lease); -1: none
--   lease: wanted        how many requests like this one the replica would like to admit on
--                        its own (0 or 1: this request only). See "Leases" below.
--   queue: ticket, alive_ms  the request's ticket (joining the queue on its first call) and
--                        how long it holds its place unless asked again. The estimates of
--                        the live tickets ahead of it count as used on every candidate, so
--                        it is admitted only when those would be too: oldest first, fleet-
--                        wide. Admitted, the ticket leaves the queue.
-- Returns {1, i, bucket_start_ms, ledger, now_ms, n}  candidate i admits n requests (the
--                                      estimate n times and n requests are charged to its
--                                      bucket starting at bucket_start_ms; n > 1 is a lease);
--                                      ledger is its running count of admitted tokens; now_ms
--                                      is the admission time (the breaker epoch)
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
--
-- Leases: a replica that admits many requests on a member asks for n of them at once and
-- admits the rest without a round trip. A lease is granted only to a healthy member (no
-- probe, no breaker count, no capacity hint saying it is near full) and never for more than
-- an eighth of the budget left in the window, so near a budget's edge every request is
-- decided here, one by one. The replica gives back what it did not use (release.lua).

local ACQUIRE = fields{'estimate', 'bucket_ms', 'window_ms', 'clock', 'hint_ttl_ms', 'probe_ms', 'reservation_id'}
local CANDIDATE = fields{'tokens_per_window', 'requests_per_window', 'spill_utilization', 'ceiling'}
local LEASE = fields{'wanted'}
local QUEUE = fields{'ticket', 'alive_ms'}

local args = read(ACQUIRE, 1)
local estimate = tonumber(args.estimate)
local bucket = tonumber(args.bucket_ms)
local window = tonumber(args.window_ms)
if estimate == nil or estimate < 0 or estimate ~= math.floor(estimate) then
  return fail('estimated tokens must be a whole number >= 0')
end
if bucket == nil or bucket < 1 or window == nil or window < 1 then
  return fail('bucket and window lengths must be >= 1 ms')
end
local queued = #KEYS >= 6 and (#KEYS - 3) % 3 == 0
local queue_keys = queued and 2 or 0
local candidates = (#KEYS - 1 - queue_keys) / 3
local queue_args = queued and QUEUE.length or 0
if #KEYS < 4 or (#KEYS - 1 - queue_keys) % 3 ~= 0
    or #ARGV ~= ACQUIRE.length + candidates * CANDIDATE.length + LEASE.length + queue_args then
  return fail('expected the pending key, then 3 keys and 4 limits per candidate, then the lease (and the queue)')
end
local wanted = tonumber(read(LEASE, ACQUIRE.length + candidates * CANDIDATE.length + 1).wanted)
if wanted == nil or wanted < 0 or wanted ~= math.floor(wanted) then
  return fail('the lease must be a whole number of requests >= 0')
end
local pending_key, id = KEYS[1], args.reservation_id
if id ~= '' and redis.call('HEXISTS', pending_key, id) == 1 then
  -- Released before it ran (its caller gave up on it): admit nothing.
  return {0, 0, 0}
end
local hint_ttl = tonumber(args.hint_ttl_ms) or 0
local probe = tonumber(args.probe_ms) or 0

local now = clock_ms(args.clock)

-- In turn: join the queue (or renew this ticket's place) and count the live tickets ahead.
-- A ticket not renewed in time leaves when it is next met (its holder died or left).
local ahead = 0
local queue_key, tickets_key, ticket
if queued then
  queue_key, tickets_key = KEYS[#KEYS - 1], KEYS[#KEYS]
  local q = read(QUEUE, #ARGV - QUEUE.length + 1)
  ticket = q.ticket
  local alive = tonumber(q.alive_ms)
  if ticket == '' or alive == nil or alive < 1 then
    return fail('a ticket needs an id and an alive time >= 1 ms')
  end
  if redis.call('ZSCORE', queue_key, ticket) == false then
    redis.call('ZADD', queue_key, redis.call('HINCRBY', tickets_key, '#next', 1), ticket)
  end
  redis.call('HSET', tickets_key, ticket, fmt(estimate) .. '|' .. fmt(now + alive))
  local keep = math.max(2 * alive, 2 * window)
  redis.call('PEXPIRE', queue_key, keep)
  redis.call('PEXPIRE', tickets_key, keep)
  local rank = redis.call('ZRANK', queue_key, ticket)
  -- Bounded work: a ticket with more than 1,000 ahead waits (counted as a full window).
  local before = {}
  if rank > 0 then before = redis.call('ZRANGE', queue_key, 0, math.min(rank, 1000) - 1) end
  for _, other in ipairs(before) do
    local held = redis.call('HGET', tickets_key, other)
    local tokens, until_ms
    if held then tokens, until_ms = string.match(held, '^(%d+)|(%d+)$') end
    if tokens == nil or tonumber(until_ms) <= now then
      redis.call('ZREM', queue_key, other)
      redis.call('HDEL', tickets_key, other)
    else
      ahead = ahead + tonumber(tokens)
    end
  end
  if rank > 1000 then ahead = math.huge end
end

local function fits(used_tokens, used_requests, tpm, rpm, ceiling)
  used_tokens = used_tokens + ahead
  local tokens_ok = tpm < 0 or used_tokens + estimate <= tpm or used_tokens == 0
  local requests_ok = rpm < 0 or used_requests < rpm
  local below_line = ceiling < 0 or used_tokens + estimate <= ceiling
  return tokens_ok and requests_ok and below_line
end

local earliest = -1
local throttled = 0

-- Usage in the window as running sums: the hash keeps `sum_tokens`, `sum_requests`, the
-- `oldest` and `newest` bucket starts and `bucket_ms` beside the buckets. Buckets that left
-- the window are subtracted from the oldest end, so admission costs the same whatever the
-- window's resolution. Sums missing (a key from before) or a changed bucket length: rebuilt
-- from the buckets once.
local function window_usage(usage_key)
  local u = redis.call('HMGET', usage_key, 'sum_tokens', 'sum_requests', 'oldest', 'newest', 'bucket_ms')
  local sum_t, sum_r, oldest, newest = tonumber(u[1]), tonumber(u[2]), tonumber(u[3]), tonumber(u[4])
  if sum_t == nil or sum_r == nil or tonumber(u[5]) ~= bucket then
    sum_t, sum_r, oldest, newest = 0, 0, nil, nil
    local raw = redis.call('HGETALL', usage_key)
    for j = 1, #raw, 2 do
      local kind, start = string.match(raw[j], '^(%a+):(%d+)$')
      start = tonumber(start)
      if start ~= nil then
        if start + bucket + window <= now or start % bucket ~= 0 then
          redis.call('HDEL', usage_key, raw[j])
        else
          local value = tonumber(raw[j + 1]) or 0
          if kind == 'tokens' then sum_t = sum_t + value elseif kind == 'requests' then sum_r = sum_r + value end
          if oldest == nil or start < oldest then oldest = start end
          if newest == nil or start > newest then newest = start end
        end
      end
    end
    redis.call('HSET', usage_key, 'sum_tokens', sum_t, 'sum_requests', sum_r, 'bucket_ms', bucket)
    redis.call('HDEL', usage_key, 'oldest', 'newest')
    if oldest ~= nil then
      redis.call('HSET', usage_key, 'oldest', fmt(oldest), 'newest', fmt(newest))
    end
  end
  if oldest ~= nil and newest ~= nil and newest + bucket + window <= now then
    -- Everything counted has left the window: start afresh.
    redis.call('DEL', usage_key)
    redis.call('HSET', usage_key, 'sum_tokens', 0, 'sum_requests', 0, 'bucket_ms', bucket)
    return 0, 0, nil
  end
  local moved = false
  while oldest ~= nil and oldest + bucket + window <= now do
    local ft, fr = 'tokens:' .. fmt(oldest), 'requests:' .. fmt(oldest)
    local v = redis.call('HMGET', usage_key, ft, fr)
    sum_t = sum_t - (tonumber(v[1]) or 0)
    sum_r = sum_r - (tonumber(v[2]) or 0)
    redis.call('HDEL', usage_key, ft, fr)
    oldest = oldest + bucket
    moved = true
  end
  if moved then
    sum_t, sum_r = math.max(sum_t, 0), math.max(sum_r, 0)
    redis.call('HSET', usage_key, 'sum_tokens', sum_t, 'sum_requests', sum_r, 'oldest', fmt(oldest))
  end
  return sum_t, sum_r, oldest
end

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

-- How many requests a lease may cover by the upstream's own word: a fresh remaining-tokens
-- hint caps it at an eighth of what is left, and none is granted while a fresh utilization
-- is within 10 points of the spill threshold (the next request reads the hint again).
local function hinted_cap(hints_key, spill)
  local h = redis.call('HMGET', hints_key, 'remaining_tokens', 'utilization', 'updated_ms')
  local updated = tonumber(h[3])
  if updated == nil or updated + hint_ttl <= now then return wanted end
  local remaining, utilization = tonumber(h[1]), tonumber(h[2])
  if spill >= 0 and utilization ~= nil and utilization >= spill - 0.1 then return 1 end
  if remaining ~= nil and estimate > 0 then return math.floor(remaining / 8 / estimate) end
  return wanted
end

for i = 1, candidates do
  local backoff_key, usage_key, hints_key = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local limits = read(CANDIDATE, ACQUIRE.length + CANDIDATE.length * (i - 1) + 1)
  local tpm, rpm = tonumber(limits.tokens_per_window), tonumber(limits.requests_per_window)
  local spill = tonumber(limits.spill_utilization)
  local ceiling = tonumber(limits.ceiling)
  local wait
  local backoff = redis.call('HMGET', backoff_key, 'until_ms', 'reason', 'opened', 'failures')
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
    local used_tokens, used_requests, oldest = window_usage(usage_key)
    if fits(used_tokens, used_requests, tpm, rpm, ceiling) then
      local probing = probe_hint or (tonumber(backoff[3]) or 0) > 0 or backoff[2] == 'throttled'
        or backoff[2] == 'probing' or (tonumber(backoff[4]) or 0) > 0
      local n = 1
      if wanted > 1 and not probing and ceiling < 0 and not queued then
        n = math.min(wanted, hinted_cap(hints_key, spill))
        if tpm >= 0 and estimate > 0 then n = math.min(n, math.floor((tpm - used_tokens) / 8 / estimate)) end
        if rpm >= 0 then n = math.min(n, math.floor((rpm - used_requests) / 8)) end
        n = math.max(n, 1)
      end
      local charged = estimate * n
      local start = now - (now % bucket)
      local field = fmt(start)
      redis.call('HINCRBY', usage_key, 'tokens:' .. field, charged)
      redis.call('HINCRBY', usage_key, 'requests:' .. field, n)
      redis.call('HINCRBY', usage_key, 'sum_tokens', charged)
      redis.call('HINCRBY', usage_key, 'sum_requests', n)
      redis.call('HSET', usage_key, 'newest', field)
      if oldest == nil then redis.call('HSET', usage_key, 'oldest', field) end
      redis.call('PEXPIRE', usage_key, 2 * (window + bucket))
      if id ~= '' then
        redis.call('HSET', pending_key, id, string.format('%d|%d|%d|%d', i, start, charged, n))
        redis.call('PEXPIRE', pending_key, 2 * (window + bucket))
      end
      -- Hint ledger: requests admitted since the upstream's last answer use up its
      -- remaining tokens, so concurrent requests see the room shrink; never below none.
      local h = redis.call('HMGET', hints_key, 'remaining_tokens', 'updated_ms')
      local remaining = tonumber(h[1])
      if remaining ~= nil and tonumber(h[2]) ~= nil and tonumber(h[2]) + hint_ttl > now then
        redis.call('HSET', hints_key, 'remaining_tokens', fmt(math.max(remaining - charged, 0)))
      end
      local ledger = redis.call('HINCRBY', hints_key, 'admitted_tokens', charged)
      if redis.call('PTTL', hints_key) < 0 then
        redis.call('PEXPIRE', hints_key, 2 * (window + bucket))
      end
      if probe_hint then
        -- The last hint said "full" and has expired: this request probes; the others keep
        -- treating the hint as fresh until its answer brings a new one.
        redis.call('HSET', hints_key, 'updated_ms', fmt(now))
      end
      if (tonumber(backoff[3]) or 0) > 0 or backoff[2] == 'throttled' or backoff[2] == 'probing' then
        -- Half-open breaker, or a 429's backoff over: this request probes; the others wait
        -- for its outcome.
        redis.call('HSET', backoff_key, 'until_ms', fmt(now + probe), 'reason', 'probing')
        redis.call('PEXPIRE', backoff_key, math.max(redis.call('PTTL', backoff_key), probe))
      end
      if queued then
        redis.call('ZREM', queue_key, ticket)
        redis.call('HDEL', tickets_key, ticket)
      end
      return {1, i, start, ledger, now, n}
    end
    -- Refused: wait until enough of the oldest buckets have left (this walk is the only
    -- per-bucket work, and only on refusals).
    throttled = 1
    wait = window
    local start = oldest
    while start ~= nil and start <= now do
      local v = redis.call('HMGET', usage_key, 'tokens:' .. fmt(start), 'requests:' .. fmt(start))
      used_tokens = used_tokens - (tonumber(v[1]) or 0)
      used_requests = used_requests - (tonumber(v[2]) or 0)
      if fits(used_tokens, used_requests, tpm, rpm, ceiling) then
        wait = math.max(start + bucket + window - now, 1)
        break
      end
      start = start + bucket
    end
  end
  if earliest < 0 or wait < earliest then earliest = wait end
end

return {0, math.max(earliest, 0), throttled}
