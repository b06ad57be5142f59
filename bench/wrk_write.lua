-- wrk script for bench/ingest.sh: each thread is one agent with one connection; it POSTs
-- its batch files DIR/c<thread>-<k>.lp (k = 0, 1, ...) to PATH once, in order, then stops.
-- `done` prints one JSON line: batches sent, 2xx answers, the wall time from the first
-- request to the last answer, latency.
--
--   wrk -tN -cN -d300s --timeout 60s -s bench/wrk_write.lua URL -- DIR PATH N DONE_FILE [ENCODING]
--
-- ENCODING `gzip`: the files are gzipped, sent with `Content-Encoding: gzip`.
--
-- wrk itself runs for its whole -d duration; so the last thread to finish interrupts it
-- (SIGINT to wrk's main thread, which is what ends wrk's sleep), and the time is measured
-- here with the monotonic clock (LuaJIT's FFI).
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk, wrk_timespec *ts);
int getpid(void);
long syscall(long n, ...);
]]
local clock = ffi.new("wrk_timespec")
local function now()
  ffi.C.clock_gettime(1, clock) -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) / 1e9
end

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local dir, path = args[1], args[2]
  nthreads, done_file = tonumber(args[3]), args[4]
  local headers = { ["Content-Type"] = "text/plain" }
  if args[5] == "gzip" then headers["Content-Encoding"] = "gzip" end
  reqs = {}
  local k = 0
  while true do
    local f = io.open(string.format("%s/c%d-%d.lp", dir, tid, k), "rb")
    if not f then break end
    local body = f:read("*a")
    f:close()
    reqs[#reqs + 1] = wrk.format("POST", path, headers, body)
    k = k + 1
  end
  sent, ok, bad = 0, 0, 0
  started, finished = 0, 0
  -- wrk calls request() once on thread 0 before the run, to check the request.
  verify_call = tid == 0
end

function request()
  if verify_call then
    verify_call = false
    return reqs[1]
  end
  if sent == 0 then started = now() end
  sent = math.min(sent + 1, #reqs)
  return reqs[sent]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then ok = ok + 1 else bad = bad + 1 end
  if ok + bad == #reqs then
    finished = now()
    wrk.thread:stop()
    local f = io.open(done_file, "a")
    f:write("x")
    local n = f:seek("end")
    f:close()
    if n >= nthreads then
      local pid = ffi.C.getpid()
      ffi.C.syscall(234, ffi.cast("long", pid), ffi.cast("long", pid), ffi.cast("long", 2)) -- tgkill(pid, pid, SIGINT)
    end
  end
end

function done(summary, latency, requests)
  local sent_all, ok_all, bad_all, first, last = 0, 0, 0, math.huge, 0
  for _, t in ipairs(threads) do
    sent_all = sent_all + t:get("sent")
    ok_all = ok_all + t:get("ok")
    bad_all = bad_all + t:get("bad")
    first = math.min(first, t:get("started"))
    last = math.max(last, t:get("finished"))
  end
  io.write(string.format(
    '{"batches": %d, "ok": %d, "failed": %d, "duration_us": %d, "p50_ms": %.2f, "p99_ms": %.2f, "socket_errors": %d}\n',
    sent_all, ok_all, bad_all, (last - first) * 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
