-- wrk reporter for bench/run_http.sh: one JSON line at the end of a run.
--   LABEL=SYSTEM#REP#MODE wrk -s bench/wrk_json.lua ...
-- Latencies in ms; errors as wrk counts them (status = non-2xx/3xx responses).
done = function(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  local p = function(q) return latency:percentile(q) / 1000.0 end
  io.write(string.format(
    '{"label": "%s", "requests": %d, "seconds": %.3f, "req_per_s": %.1f, "mbyte_per_s": %.2f, ' ..
    '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    os.getenv("LABEL") or "", summary.requests, secs, summary.requests / secs,
    summary.bytes / secs / 1048576.0, p(50), p(90), p(99), latency.max / 1000.0,
    latency.mean / 1000.0, e.connect, e.read, e.write, e.status, e.timeout))
end
