-- A named, fenced lease (see lease.rs). KEYS[1]: the lease (a hash: holder, token; it
-- expires with the lease), KEYS[2]: its fencing counter (kept: a handful of names).
-- ARGV: op (acquire | renew | release | check), holder, token, ttl_ms.
-- Returns {granted 0|1, holder or '', token or 0, ms left or a negative PTTL}.
--
-- Each grant takes the next number of the counter, so tokens only grow. A counter that
-- is missing (a new lease, or a Redis that forgot its data) starts above every token
-- that can have been handed out before, at (server ms + 1) * 1000, as the job ids'
-- epochs do: a holder that stalled through the loss can never present a token equal to
-- or above a new holder's.
local op, holder, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token')
local mine = cur[1] == holder and tonumber(cur[2] or '0') == token

local function answer(granted)
  local h = redis.call('HMGET', KEYS[1], 'holder', 'token')
  return { granted, h[1] or '', tonumber(h[2] or '0'), redis.call('PTTL', KEYS[1]) }
end

if op == 'acquire' then
  if cur[1] then return answer(0) end
  if redis.call('EXISTS', KEYS[2]) == 0 then
    local t = redis.call('TIME')
    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('SET', KEYS[2], string.format('%d', (ms + 1) * 1000))
  end
  local granted = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'holder', holder, 'token', granted)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return answer(1)
elseif op == 'renew' then
  if not mine then return answer(0) end
  redis.call('PEXPIRE', KEYS[1], ttl)
  return answer(1)
elseif op == 'release' then
  if not mine then return answer(0) end
  redis.call('DEL', KEYS[1])
  return answer(1)
elseif op == 'check' then
  return answer(mine and 1 or 0)
end
return redis.error_reply('unknown lease op ' .. tostring(op))
