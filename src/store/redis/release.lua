-- Hands a claimed job back unstarted (shutdown). ARGV: id, attempt. It goes to the front
-- of the queue and this attempt is not counted. Returns 1 when released.
local id, attempt = ARGV[1], tonumber(ARGV[2])
local r = load(id)
if not r or r.s ~= 'running' or r.a ~= attempt then return 0 end
r.a = attempt - 1
r.st = nil
r.o = nil
r.s = 'queued'
save(id, r)
redis.call('ZREM', K_LEASES, id)
redis.call('RPUSH', K_WAIT, id)
move(id, 'running', 'queued')
return 1
