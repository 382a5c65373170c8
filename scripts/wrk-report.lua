-- Prints one machine-readable line at the end of a wrk run (used by
-- examples/bench.rs): request count, duration and latency percentiles in
-- microseconds, and the error total (non-2xx included).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50=%d p99=%d p999=%d errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.status + e.timeout))
end
