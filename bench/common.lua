-- Shared by every wrk script here (each loads it with dofile from the same directory): thread
-- numbering (thread_no, for ids unique across threads), with_auth(), and a done() that prints
-- one machine-readable line, which common.run_wrk parses. Every script takes a fresh 8-hex-digit
-- nonce as its first argument (common.run_wrk passes it): ids made from it never repeat across runs.

-- BENCH_AUTHORIZATION (e.g. "Bearer rs_...") goes with every request of every script when set:
-- bench_core.py (--auth-compare) sets it for all the servers it compares, so they receive the
-- very same bytes; a server with RECORDS_AUTH=disabled ignores the header.
function with_auth(headers)
   local value = os.getenv("BENCH_AUTHORIZATION")
   if value and value ~= "" then
      headers["Authorization"] = value
   end
   return headers
end

-- Seeds math.random for this thread from the run's nonce: another choice in every thread and run.
function seed_random(nonce)
   math.randomseed(tonumber(nonce or "0", 16) + 7919 * (thread_no or 0))
end

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("thread_no", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

-- wrk calls done() once, in the main Lua state, after every thread has stopped.
-- summary.errors.status counts responses with status >= 400 (wrk's "Non-2xx or 3xx").
function done(summary, latency, requests)
   local e = summary.errors
   local seconds = summary.duration / 1e6
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_s": %.3f, "rps": %.2f, "p50_ms": %.3f, "p90_ms": %.3f, '
      .. '"p99_ms": %.3f, "max_ms": %.3f, "bytes": %d, "non2xx": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
      latency.max / 1000, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout))
end
