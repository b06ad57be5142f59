-- Shared by every tally script (prepended to each). KEYS, the same for all of them, all
-- in the {tally} hash slot:
--   1 next_id   2 rec   3 params   4 result   5 wait   6 leases   7 counts   8 all
--   9 expiry   10..14 st:queued st:running st:done st:failed st:cancelled   15 epoch
--   16 (claim, recover_inflight) a consumer's in-flight list; (submit, with a key) the
--      entry of the submission's idempotency key: idem:<hex BLAKE3 of the client key>,
--      holding "<job id> <hex fingerprint of the request>", expiring with the key
-- epoch names the data set the ids belong to ("<random>/<first id base>"): a Redis that
-- lost its data (restarted empty, a lagging failover) has another epoch or none, and the
-- scripts that hand out ids or record outcomes refuse to act on it (see epoch.lua).
-- rec holds each job's small record as JSON: k kind, s status, sub/st/fin times (ms),
-- a attempts, b attempts when it was last retried (its budget of attempts starts there),
-- o owner (consumer holding the lease), e error.
local K_NEXT, K_REC, K_PARAMS, K_RESULT = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_WAIT, K_LEASES, K_COUNTS, K_ALL, K_EXPIRY = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local ST = { queued = KEYS[10], running = KEYS[11], done = KEYS[12], failed = KEYS[13],
             cancelled = KEYS[14] }
local K_EPOCH = KEYS[15]

-- One clock for every replica: the server's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load(id)
  local raw = redis.call('HGET', K_REC, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save(id, r)
  redis.call('HSET', K_REC, id, cjson.encode(r))
end

local function finished(s)
  return s == 'done' or s == 'failed' or s == 'cancelled'
end

-- Moves a job between states: its status index and the counters, in one place, so the
-- counts can never disagree with the records (and never go below zero). `ever:<state>`
-- counts every move into a final state and `ever:submitted` every new job (expiry never
-- lowers them: the dashboard's rates across replicas come from them; next_id would not
-- do, as it jumps past lost ids when Redis forgot its data).
local function move(id, from, to)
  if not from then
    if redis.call('HEXISTS', K_COUNTS, 'ever:submitted') == 0 then
      -- A data set written before this counter existed: it starts from the ids handed
      -- out (a data set Redis lost has it at 0 already, see epoch.lua).
      local before = tonumber(redis.call('GET', K_NEXT) or '1') - 1
      redis.call('HSET', K_COUNTS, 'ever:submitted', math.max(before, 0))
    end
    redis.call('HINCRBY', K_COUNTS, 'ever:submitted', 1)
  else
    if tonumber(redis.call('HGET', K_COUNTS, from) or '0') > 0 then
      redis.call('HINCRBY', K_COUNTS, from, -1)
    end
    redis.call('ZREM', ST[from], id)
  end
  if finished(to) then redis.call('HINCRBY', K_COUNTS, 'ever:' .. to, 1) end
  redis.call('HINCRBY', K_COUNTS, to, 1)
  redis.call('ZADD', ST[to], id, id)
end

-- Every replica listens here to answer long polls of jobs that finished anywhere.
local FINISHED_CHANNEL = '{tally}:finished'

-- A final state: the lease goes, the job expires after ttl_ms, listeners hear of it.
local function finish(id, r, status, now, ttl_ms)
  local from = r.s
  r.s = status
  r.fin = now
  r.o = nil
  save(id, r)
  redis.call('ZREM', K_LEASES, id)
  redis.call('ZADD', K_EXPIRY, now + ttl_ms, id)
  move(id, from, status)
  redis.call('PUBLISH', FINISHED_CHANNEL, id)
end
