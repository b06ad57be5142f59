-- Extends the leases a consumer holds. ARGV: consumer, lease_ms, then id, attempt pairs.
-- One answer per pair: 1 held (extended), 2 cancelled, 0 lost (reclaimed, finished, or
-- held by a newer attempt).
local consumer, lease_ms = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local out = {}
for i = 3, #ARGV, 2 do
  local id, attempt = ARGV[i], tonumber(ARGV[i + 1])
  local r = load(id)
  if r and r.s == 'running' and r.a == attempt and r.o == consumer then
    redis.call('ZADD', K_LEASES, 'XX', now + lease_ms, id)
    out[#out + 1] = 1
  elseif r and r.s == 'cancelled' then
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
return out
