-- A named, fenced lease (see lease.rs). KEYS[1]: the lease (a hash: holder, token; it
-- expires with the lease), KEYS[2]: its fencing counter (kept: a handful of names).
-- ARGV: op (acquire | renew | release | check), holder, token, ttl_ms. A release is
-- announced on the channel KEYS[1] .. ':free'.
-- Returns {granted 0|1, holder or '', token or 0, ms left or a negative PTTL}.
--
-- Each grant takes a number above the counter and above (server ms + 1) * 1000, so
-- tokens only grow, also when Redis lost some or all of its data (restarted empty, from
-- an older snapshot, or after a lagging failover: the counter is then missing or behind
-- tokens already handed out): as long as Redis's clock moves forward and fewer than
-- 1000 grants of one name fall in a millisecond, a holder that stalled through the loss
-- never presents a token equal to or above a new holder's (as the job ids' epochs do).
local op, holder, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token')
local mine = cur[1] == holder and tonumber(cur[2] or '0') == token

local function answer(granted)
  local h = redis.call('HMGET', KEYS[1], 'holder', 'token')
  return { granted, h[1] or '', tonumber(h[2] or '0'), redis.call('PTTL', KEYS[1]) }
end

if op == 'acquire' then
  if cur[1] then return answer(0) end
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local granted = math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, (ms + 1) * 1000)
  redis.call('SET', KEYS[2], string.format('%d', granted))
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
  -- A follower waiting for the name takes it now rather than at the lease's end.
  redis.call('PUBLISH', KEYS[1] .. ':free', token)
  return answer(1)
elseif op == 'check' then
  return answer(mine and 1 or 0)
end
return redis.error_reply('unknown lease op ' .. tostring(op))
