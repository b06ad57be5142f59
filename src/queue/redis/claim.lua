-- Leases jobs to a consumer. ARGV: consumer, lease_ms, id, count. With id '' it takes up
-- to `count` of the oldest waiting jobs; else the one id a blocking move put in the
-- consumer's in-flight list (KEYS[16]), if it is still there (a hand-back may have moved
-- it back to the queue). Returns a flat list, five fields per leased job: id, attempt,
-- kind, params, base (attempts before its last retry). Jobs cancelled while they waited
-- are skipped.
local consumer, lease_ms, id, count = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local ids
if id == '' then
  ids = redis.call('RPOP', K_WAIT, count)
  if not ids then return {} end
else
  if redis.call('LREM', KEYS[16], 1, id) == 0 then return {} end
  ids = { id }
end
local now = now_ms()
local out = {}
for _, jid in ipairs(ids) do
  local r = load(jid)
  if r and r.s == 'queued' then
    r.a = (r.a or 0) + 1
    r.st = now
    r.o = consumer
    r.s = 'running'
    save(jid, r)
    redis.call('ZADD', K_LEASES, now + lease_ms, jid)
    move(jid, 'queued', 'running')
    out[#out + 1] = tonumber(jid)
    out[#out + 1] = r.a
    out[#out + 1] = r.k
    out[#out + 1] = redis.call('HGET', K_PARAMS, jid) or '{}'
    out[#out + 1] = r.b or 0
  end
end
return out
