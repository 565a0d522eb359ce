-- leave: take a ticket out of a pool's queue (its client left, or it stopped waiting).
-- KEYS[1]  {prefix}:{pool}:queue    KEYS[2]  {prefix}:{pool}:tickets   (see acquire.lua)
-- ARGV: a LEAVE record (scripts.rs LeaveArgs): the ticket's id
local LEAVE = fields{'ticket'}

local args = read(LEAVE, 1)
if #KEYS ~= 2 or #ARGV ~= LEAVE.length then
  return fail('leave takes the queue and tickets keys and a ticket id')
end
redis.call('ZREM', KEYS[1], args.ticket)
redis.call('HDEL', KEYS[2], args.ticket)
return 1
