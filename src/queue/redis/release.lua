-- Hands a claimed job back. ARGV: id, attempt, spent, consumer. It goes to the front of
-- the queue; the attempt is not counted (an unstarted job at shutdown) unless `spent` is
-- 1 (it ran, and its lease expired). Only the replica holding the lease hands it back.
-- Keeps memory level, so it runs while Redis is full. Returns 1 when released.
local id, attempt, spent = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local r = load(id)
if not r or r.s ~= 'running' or r.a ~= attempt or r.o ~= ARGV[4] then return 0 end
if not spent then r.a = attempt - 1 end
r.st = nil
r.o = nil
r.s = 'queued'
save(id, r)
redis.call('ZREM', K_LEASES, id)
redis.call('RPUSH', K_WAIT, id)
move(id, 'running', 'queued')
return 1
