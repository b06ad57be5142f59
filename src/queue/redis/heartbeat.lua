-- A replica says it is alive, by the server's clock (replicas' clocks may disagree).
-- KEYS[16]: the replicas sorted set, KEYS[17]: this replica's hash. ARGV: consumer, host,
-- pid, workers, busy, ttl_ms. Returns {server ms, epoch, next_id}: the replica checks
-- that Redis still holds the data set it knows, and learns how far ids have gone. Keeps
-- memory level, so it runs while Redis is full.
-- KEYS[18]: the totals history, ARGV[7]: the seconds it keeps. The first heartbeat in
-- each second (of the server's clock) records the cluster's totals there, as
-- "<server ms> <submitted> <done> <failed> <cancelled>" scored by the second: the
-- dashboard's rates for the last minutes, whichever replica a page asks. The oldest
-- sample falls off as a new one comes, so it too keeps memory level.
local now = now_ms()
redis.call('ZADD', KEYS[16], now, ARGV[1])
redis.call('HSET', KEYS[17], 'host', ARGV[2], 'pid', ARGV[3], 'workers', ARGV[4],
  'busy', ARGV[5], 'seen_ms', now)
redis.call('PEXPIRE', KEYS[17], tonumber(ARGV[6]))
local second = math.floor(now / 1000)
if redis.call('ZCOUNT', KEYS[18], second, second) == 0 then
  local c = redis.call('HMGET', K_COUNTS, 'ever:submitted', 'ever:done', 'ever:failed',
    'ever:cancelled')
  redis.call('ZADD', KEYS[18], second, table.concat({ now, c[1] or '0', c[2] or '0',
    c[3] or '0', c[4] or '0' }, ' '))
  redis.call('ZREMRANGEBYSCORE', KEYS[18], '-inf', second - tonumber(ARGV[7]))
  redis.call('PEXPIRE', KEYS[18], tonumber(ARGV[7]) * 1000)
end
return { now, redis.call('GET', K_EPOCH) or '', tonumber(redis.call('GET', K_NEXT) or '0') }
