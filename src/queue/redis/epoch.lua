-- Which data set this Redis holds. ARGV: the epoch the replica knows ('' when it opens),
-- the highest id it knows was handed out, a fresh epoch name. An epoch is
-- "<name>/<base>": base 0 for a store that started empty, else the first id of a range
-- begun after a loss. Returns {epoch, next_id, lost}, lost = 1 when this call began a
-- new range.
--
-- Opening ('' known): an existing epoch is adopted; none is a new store (ids from 1), or
-- a store written before epochs existed (its counter kept).
-- Known epoch: if Redis still has it and a counter at or above the high water, nothing
-- was lost. Else Redis forgot ids it handed out (restarted without persistence, a
-- lagging failover): the counter moves past every id any replica can have handed out,
-- max(high water, its own value, (server ms + 1) * 1000), under a new epoch. While fewer
-- than 1000 ids a millisecond are handed out, a range begun at millisecond m is still
-- below (m' + 1) * 1000 at any later millisecond m', so the next range, begun later,
-- starts above it (ids stay below 2^53, exact in every JSON client, for two centuries).
-- Another replica's new range (base > 0, counter at or above the high water) is adopted
-- as it is.
local known, high, fresh = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local cur = redis.call('GET', K_EPOCH)
local nid = tonumber(redis.call('GET', K_NEXT) or '0')
if known == '' then
  if not cur then
    cur = fresh .. '/0'
    redis.call('SET', K_EPOCH, cur)
    if nid == 0 then redis.call('HSETNX', K_COUNTS, 'ever:submitted', 0) end
  end
  return { cur, nid, 0 }
end
if nid >= high and cur and (cur == known or tonumber(string.match(cur, '/(%d+)$') or '0') > 0) then
  return { cur, nid, 0 }
end
local base = math.max(nid, high, (now_ms() + 1) * 1000)
cur = fresh .. '/' .. string.format('%d', base)
redis.call('SET', K_EPOCH, cur)
redis.call('SET', K_NEXT, string.format('%d', base))
-- Jobs counted from here (not from the new range's first id) where the count was lost.
redis.call('HSETNX', K_COUNTS, 'ever:submitted', 0)
return { cur, base, 1 }
