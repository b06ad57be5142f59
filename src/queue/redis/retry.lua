-- Runs a failed or cancelled job again, same id. ARGV: id. Returns {1, attempts} when
-- queued again; {2, status} when it is not failed or cancelled; {0} when unknown.
local id = ARGV[1]
local r = load(id)
if not r then return { 0 } end
if r.s ~= 'failed' and r.s ~= 'cancelled' then return { 2, r.s } end
local from = r.s
r.s = 'queued'
-- A fresh budget of attempts from here.
r.b = r.a or 0
r.st = nil
r.fin = nil
r.e = nil
r.o = nil
save(id, r)
redis.call('HDEL', K_RESULT, id)
redis.call('ZREM', K_EXPIRY, id)
redis.call('LPUSH', K_WAIT, id)
move(id, from, 'queued')
return { 1, r.a or 0 }
