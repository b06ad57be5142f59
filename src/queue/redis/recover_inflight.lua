-- Puts back on the queue what a consumer had taken off it but not leased (KEYS[16], its
-- in-flight list): a dead consumer's, or this one's after a blocking move whose reply was
-- lost. Frees memory or keeps it level, so it runs while Redis is full. Returns how many.
local n = 0
while redis.call('RPOPLPUSH', KEYS[16], K_WAIT) do
  n = n + 1
end
return n
