-- ARGV: kind, params (JSON text), capacity (0 = none), consumer, lease_ms, epoch, high
-- water (the highest id the calling replica knows was handed out), and for a submission
-- with an idempotency key (KEYS[16]) its request's fingerprint and lifetime (ms).
-- Returns {id, 0} for a
-- job queued, {id, 1} for one leased at once to `consumer` (given when that replica has a
-- worker waiting: the job skips the queue), {0} when the queue already holds `capacity`
-- jobs, or {-1} when Redis is not the data set the replica knows (another epoch, none, or
-- a counter below ids already handed out): the replica runs epoch.lua before any id is
-- handed out again.
if redis.call('GET', K_EPOCH) ~= ARGV[6]
    or tonumber(redis.call('GET', K_NEXT) or '0') < tonumber(ARGV[7]) then
  return { -1 }
end
local capacity = tonumber(ARGV[3])
if capacity > 0 and redis.call('LLEN', K_WAIT) >= capacity then
  return { 0 }
end
-- With KEYS[16] (the entry of the submission's idempotency key), ARGV[8] is the
-- request's fingerprint and ARGV[9] the key's lifetime (ms): a key already held makes
-- nothing and returns {first id, 2} for the same request, {first id, 3} for another.
local idem = KEYS[16]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local sep = string.find(seen, ' ', 1, true)
    local same = string.sub(seen, sep + 1) == ARGV[8]
    return { tonumber(string.sub(seen, 1, sep - 1)), same and 2 or 3 }
  end
end
local id = redis.call('INCR', K_NEXT)
if idem then redis.call('SET', idem, id .. ' ' .. ARGV[8], 'PX', ARGV[9]) end
local now = now_ms()
local consumer = ARGV[4]
redis.call('HSET', K_PARAMS, id, ARGV[2])
redis.call('ZADD', K_ALL, id, id)
if consumer ~= '' then
  save(id, { k = ARGV[1], s = 'running', sub = now, st = now, a = 1, o = consumer })
  redis.call('ZADD', K_LEASES, now + tonumber(ARGV[5]), id)
  move(id, nil, 'running')
  return { id, 1 }
end
save(id, { k = ARGV[1], s = 'queued', sub = now, a = 0 })
redis.call('LPUSH', K_WAIT, id)
move(id, nil, 'queued')
return { id, 0 }
