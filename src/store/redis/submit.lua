-- ARGV: kind, params (JSON text), capacity (0 = none). Returns the new id, or 0 when the
-- queue already holds `capacity` jobs.
local capacity = tonumber(ARGV[3])
if capacity > 0 and redis.call('LLEN', K_WAIT) >= capacity then
  return 0
end
local id = redis.call('INCR', K_NEXT)
local now = now_ms()
save(id, { k = ARGV[1], s = 'queued', sub = now, a = 0 })
redis.call('HSET', K_PARAMS, id, ARGV[2])
redis.call('LPUSH', K_WAIT, id)
redis.call('ZADD', K_ALL, id, id)
move(id, nil, 'queued')
return id
