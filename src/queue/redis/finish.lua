-- Records an outcome. ARGV: id, attempt (-1 = any: a cancel), status, body (the result
-- when done, else the error), started_at (ms, 0 = unknown), ttl_ms, consumer (the
-- worker's replica; '' for a cancel).
-- Returns 1 recorded, 2 already finished, 3 stale (a newer attempt or another replica
-- holds the job), 0 unknown. The owner check also fences an outcome across a loss of
-- Redis's data: consumer names are unique per process start, so a job of the new data
-- set that this consumer holds was claimed by it there.
local id, attempt, status, body = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local started, ttl_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local r = load(id)
if not r then return 0 end
if attempt >= 0 and attempt < (r.a or 0) then return 3 end
if finished(r.s) then return 2 end
-- A worker's outcome counts only while its attempt holds the lease: a job reclaimed (or
-- handed back) and not claimed again keeps that attempt's number, but not its lease.
if attempt >= 0 and (r.s ~= 'running' or attempt ~= (r.a or 0) or r.o ~= ARGV[7]) then
  return 3
end
if not r.st and started > 0 then r.st = started end
if status == 'done' then
  redis.call('HSET', K_RESULT, id, body)
else
  r.e = body
end
-- Only a cancel (any attempt) finishes a job that waits.
if r.s == 'queued' then redis.call('LREM', K_WAIT, 1, id) end
finish(id, r, status, now_ms(), ttl_ms)
return 1
