-- Deletes finished jobs whose time is up (--result-ttl). ARGV: limit. Returns how many.
-- It frees memory, so it must run while Redis is full (allow-oom): the deletes come
-- first, the counters after them.
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', K_EXPIRY, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local gone = {}
for i, id in ipairs(ids) do
  local r = load(id)
  gone[i] = r and r.s
  redis.call('HDEL', K_REC, id)
  redis.call('HDEL', K_PARAMS, id)
  redis.call('HDEL', K_RESULT, id)
  redis.call('ZREM', K_ALL, id)
  redis.call('ZREM', K_EXPIRY, id)
  if r then redis.call('ZREM', ST[r.s], id) end
end
for _, s in pairs(gone) do
  if tonumber(redis.call('HGET', K_COUNTS, s) or '0') > 0 then
    redis.call('HINCRBY', K_COUNTS, s, -1)
  end
end
return #ids
