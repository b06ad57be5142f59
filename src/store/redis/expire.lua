-- Deletes finished jobs whose time is up (--result-ttl). ARGV: limit. Returns how many.
local now = now_ms()
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local r = load(id)
  if r then
    if tonumber(redis.call('HGET', K_COUNTS, r.s) or '0') > 0 then
      redis.call('HINCRBY', K_COUNTS, r.s, -1)
    end
    redis.call('ZREM', ST[r.s], id)
  end
  redis.call('HDEL', K_REC, id)
  redis.call('HDEL', K_PARAMS, id)
  redis.call('HDEL', K_RESULT, id)
  redis.call('ZREM', K_ALL, id)
  redis.call('ZREM', K_EXPIRY, id)
  n = n + 1
end
return n
