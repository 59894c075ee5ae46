# Sourced (from the repository root) by bench/instructions.sh and bench/cpu_split.sh: PY, a work
# directory WORK (removed on exit, with every background job stopped; KEEP=DIR copies callgrind's
# output there first), a port UP for the mock and a base port PORT for the proxies, and the
# harness's own configs, environment and chat wrk script (python -m bench.sidegate_setup):
# BENCH_BARE, BENCH_FULL, BENCH_CHAT_LUA and the BENCH_* the configs interpolate.
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$WORK"/cg.out* "$KEEP"/ ; rm -rf "$WORK"' EXIT
PORT=$((20000 + RANDOM % 4000)); UP=$((25000 + RANDOM % 5000))
eval "$($PY -m bench.sidegate_setup "$WORK" "http://127.0.0.1:$UP")"

# wait_for PORT: until something answers HTTP there (at most a minute).
wait_for() {
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.2
  done
  return 1
}
