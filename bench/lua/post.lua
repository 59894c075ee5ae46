-- One POST workload for wrk, rendered by bench/wrk.py: ${NAME} to ${PATH}.
-- Rerun by hand with: wrk -t1 -c16 -d10s -s <this file> http://127.0.0.1:<port>${PATH}
wrk.method = "POST"
wrk.path = "${PATH}"
wrk.body = [==[${BODY}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer ${KEY}"

-- One JSON line after wrk's own report: what bench/wrk.py reads.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
