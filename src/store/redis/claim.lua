-- Leases the next job to a consumer. ARGV: consumer, lease_ms, id ('' = take the oldest
-- waiting job; else the id a blocking move put in the consumer's in-flight list, KEYS[15]).
-- Returns {id, attempt, kind, params, base}, or {} when there was nothing to run (an empty
-- queue, or a job cancelled while it waited).
local consumer, lease_ms, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if id == '' then
  id = redis.call('RPOP', K_WAIT)
  if not id then return {} end
else
  redis.call('LREM', KEYS[15], 1, id)
end
local r = load(id)
if not r or r.s ~= 'queued' then return {} end
local now = now_ms()
r.a = (r.a or 0) + 1
r.st = now
r.o = consumer
local from = r.s
r.s = 'running'
save(id, r)
redis.call('ZADD', K_LEASES, now + lease_ms, id)
move(id, from, 'running')
return { tonumber(id), r.a, r.k, redis.call('HGET', K_PARAMS, id) or '{}', r.b or 0 }
