-- wrk script for bench/serve_load.py: POST the JSON body in $WRK_BODY, then print one line
-- "WRKJSON {...}" with the request count, errors and latency percentiles (microseconds), and the
-- median engine time the server reported in its Server-Timing header ("engine;dur=MS"), -1 when
-- no response had one.
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"

local threads = {}
engine_ms = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  local timing = headers["server-timing"] or headers["Server-Timing"]
  local ms = timing and timing:match("engine;dur=([%d%.]+)")
  if ms then
    engine_ms[#engine_ms + 1] = tonumber(ms)
  end
end

function done(summary, latency, requests)
  local all = {}
  for _, thread in ipairs(threads) do
    for _, ms in ipairs(thread:get("engine_ms") or {}) do
      all[#all + 1] = ms
    end
  end
  table.sort(all)
  local engine_p50_us = -1
  if #all > 0 then
    engine_p50_us = 1000 * all[math.floor((#all + 1) / 2)]
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "max_us": %d, "engine_p50_us": %.1f, "engine_n": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max, engine_p50_us, #all))
end
