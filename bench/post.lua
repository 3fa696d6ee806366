-- wrk script: POST a JSON body to one path, then print the run's numbers as one JSON line.
-- Usage: wrk -s bench/post.lua URL -- PATH BODY STAGGER_MS CONNECTIONS_PER_THREAD API_KEY|- WINDOW_START WINDOW_END
--
-- wrk opens every connection at the same instant, so with a 1 s upstream all clients would send in lock-step
-- waves, a burst of N requests in one millisecond every second, for the whole run. Real clients are not
-- synchronised: each connection's first request waits a random 0..STAGGER_MS ms (wrk does not count that wait
-- in latency), and the connections then stay spread over the upstream's second.
--
-- WINDOW_START and WINDOW_END (CLOCK_MONOTONIC seconds; 0 0 for none) bound the measured window: the responses
-- that complete inside it are counted, so a run can leave out its ramp, when no answer can come back yet.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now = ffi.new("bench_timespec")

local stagger_ms, first_requests, started = 0, 0, 0
local window_start, window_end = 0, 0
in_window = 0 -- a global, so done() can read each thread's count
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function count_if_in_window()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  local t = tonumber(now.tv_sec) + tonumber(now.tv_nsec) / 1e9
  if t >= window_start and t < window_end then in_window = in_window + 1 end
end

function init(args)
  wrk.method = "POST"
  wrk.path = args[1]
  wrk.body = args[2]
  stagger_ms, first_requests = tonumber(args[3]), tonumber(args[4])
  wrk.headers["Content-Type"] = "application/json"
  if args[5] ~= "-" then wrk.headers["X-API-KEY"] = args[5] end
  window_start, window_end = tonumber(args[6]), tonumber(args[7])
  -- Only a windowed run pays for wrk handing each response to Lua.
  if window_end > 0 then
    response = function() count_if_in_window() end
  end
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
end

function delay()
  if started < first_requests then
    started = started + 1
    return math.random(0, stagger_ms)
  end
  return 0
end

function done(summary, latency, requests)
  local e = summary.errors
  local counted = 0
  for _, thread in ipairs(threads) do counted = counted + (thread:get("in_window") or 0) end
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "mean_ms": %.3f, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f, ' ..
    '"non_2xx": %d, "socket_errors": %d, "in_window": %d}\n',
    summary.requests, summary.duration / 1e6, latency.mean / 1e3, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.status, e.connect + e.read + e.write + e.timeout, counted))
end
