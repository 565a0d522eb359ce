-- spend_quota: add tokens to a long-period quota counter (a consumer's hourly, daily,
-- weekly or monthly token quota) and return its total. The counter's name carries its
-- period, so a new period starts a new counter; the old one expires at its period's end.
--
-- KEYS[1]  {prefix}:quota:{<consumer>}:<period>:<period_start>   string, a whole number
-- ARGV: one record (scripts.rs QuotaArgs)
--   tokens         tokens to add (whole number >= 0; 0 reads the counter)
--   expires_at_ms  when the counter is forgotten: unix time, ms
-- Returns the counter's total. Errors "ERR spillway: ..." on malformed arguments.
local QUOTA = fields{'tokens', 'expires_at_ms'}

local args = read(QUOTA, 1)
local tokens, expires_at = tonumber(args.tokens), tonumber(args.expires_at_ms)
if #KEYS ~= 1 or #ARGV ~= QUOTA.length or tokens == nil or tokens < 0 or expires_at == nil or expires_at < 1 then
  return fail('spend_quota takes 1 key, tokens, expiry (unix ms)')
end
if tokens == 0 then
  return tonumber(redis.call('GET', KEYS[1]) or '0')
end
local total = redis.call('INCRBY', KEYS[1], fmt(tokens))
redis.call('PEXPIREAT', KEYS[1], fmt(expires_at))
return total
