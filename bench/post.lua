-- wrk script: POST a JSON body to one path, then print the run's numbers as one JSON line.
-- Usage: wrk -s bench/post.lua URL -- PATH BODY STAGGER_MS CONNECTIONS_PER_THREAD [API_KEY]
--
-- wrk opens every connection at the same instant, so with a 1 s upstream all clients would send in lock-step
-- waves, a burst of N requests in one millisecond every second, for the whole run. Real clients are not
-- synchronised: each connection's first request waits a random 0..STAGGER_MS ms (wrk does not count that wait
-- in latency), and the connections then stay spread over the upstream's second.
local stagger_ms, first_requests, started = 0, 0, 0

function init(args)
  wrk.method = "POST"
  wrk.path = args[1]
  wrk.body = args[2]
  stagger_ms, first_requests = tonumber(args[3]), tonumber(args[4])
  wrk.headers["Content-Type"] = "application/json"
  if args[5] then wrk.headers["X-API-KEY"] = args[5] end
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
  io.write(string.format(
    'BENCH {"requests": %d, "seconds": %.3f, "mean_ms": %.3f, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f, ' ..
    '"non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency.mean / 1e3, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.status, e.connect + e.read + e.write + e.timeout))
end
