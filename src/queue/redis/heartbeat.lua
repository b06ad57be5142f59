-- A replica says it is alive, by the server's clock (replicas' clocks may disagree).
-- KEYS[16]: the replicas sorted set, KEYS[17]: this replica's hash. ARGV: consumer, host,
-- pid, workers, busy, ttl_ms. Returns {server ms, epoch, next_id}: the replica checks
-- that Redis still holds the data set it knows, and learns how far ids have gone. Keeps
-- memory level, so it runs while Redis is full.
local now = now_ms()
redis.call('ZADD', KEYS[16], now, ARGV[1])
redis.call('HSET', KEYS[17], 'host', ARGV[2], 'pid', ARGV[3], 'workers', ARGV[4],
  'busy', ARGV[5], 'seen_ms', now)
redis.call('PEXPIRE', KEYS[17], tonumber(ARGV[6]))
return { now, redis.call('GET', K_EPOCH) or '', tonumber(redis.call('GET', K_NEXT) or '0') }
