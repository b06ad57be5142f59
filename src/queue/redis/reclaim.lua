-- Reclaims expired leases. ARGV: max_attempts, ttl_ms, limit, dead-letter message prefix.
-- Each expired job is queued again at the front, or, once it used up max_attempts,
-- failed for good. Returns a flat list: id, attempt, 1 (requeued) or 2 (dead), ...
local max_attempts, ttl_ms, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)) do
  local r = load(id)
  redis.call('ZREM', K_LEASES, id)
  if r and r.s == 'running' then
    local attempt = r.a or 0
    -- Attempts since the job was last queued by a retry.
    if attempt - (r.b or 0) >= max_attempts then
      r.e = string.format(ARGV[4], attempt - (r.b or 0))
      finish(id, r, 'failed', now, ttl_ms)
      out[#out + 1] = tonumber(id); out[#out + 1] = attempt; out[#out + 1] = 2
    else
      r.s = 'queued'
      r.o = nil
      r.st = nil
      save(id, r)
      redis.call('RPUSH', K_WAIT, id)
      move(id, 'running', 'queued')
      out[#out + 1] = tonumber(id); out[#out + 1] = attempt; out[#out + 1] = 1
    end
  end
end
return out
