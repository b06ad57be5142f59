-- Puts back on the queue what a dead consumer had taken off it but not yet leased
-- (KEYS[15], its in-flight list). Returns how many.
local n = 0
while redis.call('RPOPLPUSH', KEYS[15], K_WAIT) do
  n = n + 1
end
return n
