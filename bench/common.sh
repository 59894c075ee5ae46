# Sourced (from the repository root) by bench/instructions.sh, bench/cpu_split.sh and
# bench/knockouts.sh: PY, a work directory WORK (removed on exit, with every background job
# stopped; KEEP=DIR copies callgrind's output there first), a port UP for the mock and a base
# port PORT for the proxies, the harness's own configs, environment and chat wrk script (python
# -m bench.sidegate_setup): BENCH_BARE, BENCH_FULL, BENCH_CHAT_LUA and the BENCH_* the configs
# interpolate; and wait_for, speed_ms and cpu_per_request (below). BUSY=1 keeps CPU 0 busy (below).
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$WORK"/cg.out* "$KEEP"/ ; rm -rf "$WORK"' EXIT
PORT=$((20000 + RANDOM % 4000)); UP=$((25000 + RANDOM % 5000))
eval "$($PY -m bench.sidegate_setup "$WORK" "http://127.0.0.1:$UP")"

# BUSY=1: a spinner at nice 19 on CPU 0 beside the proxies, so that CPU never goes idle between
# requests (a diagnosis, never a figure to report as sidegate's): on a VM, waking an idle CPU can
# cost the woken process more than its work (VM K's c=1 rows: see *VM K* in bench/HISTORY.md). The
# proxies preempt it when they wake; their own CPU time is what is measured, as without it.
if [ "${BUSY:-}" = 1 ]; then
  taskset -c 0 nice -n 19 $PY -c 'while True: pass' &
fi

# wait_for PORT: until something answers HTTP there (at most a minute).
wait_for() {
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.2
  done
  return 1
}

# speed_ms: how fast CPU 0 runs Python now (python -m bench.calibrate: CPU ms for a fixed loop,
# best of three; a VM's speed can change from one minute to the next, see *VM Q* in
# bench/HISTORY.md).
speed_ms() {
  taskset -c 0 $PY -m bench.calibrate
}

# cpu_per_request PID PORT C SECONDS: load PORT's chat endpoint with wrk at concurrency C (1 s to
# warm up, then SECONDS measured) and print "REQUESTS USER_US SYSTEM_US": the requests completed,
# and PID's utime and stime (/proc/PID/stat) over them, in µs a request. Answers other than 2xx
# and 3xx (wrk counts them as requests) are reported on stderr: a knock-out that stops sidegate
# doing its work (key_rotation out of a config with a key pool: no key, the mock answers 401)
# measures the refusal, not the work. A fourth field, SLEEPS, is how often a request the main
# thread went to sleep (its voluntary context switches, /proc/PID/status, to two decimals): at
# c=1 every sleep is an idle CPU to wake again (*VM P* and *VM Q* in bench/HISTORY.md).
cpu_per_request() {
  local url=http://127.0.0.1:$2/v1/chat/completions hz n u0 s0 u1 s1 v0 v1 out
  hz=$(getconf CLK_TCK)
  taskset -c 1 wrk -t1 -c"$3" -d1s -s "$BENCH_CHAT_LUA" "$url" >/dev/null
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$1/stat")
  v0=$(awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$1/status")
  out=$(taskset -c 1 wrk -t1 -c"$3" -d"$4s" -s "$BENCH_CHAT_LUA" "$url")
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$1/stat")
  v1=$(awk '/^voluntary_ctxt_switches/ {print $2}' "/proc/$1/status")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  awk '/Non-2xx or 3xx/ {print "port '"$2"': " $NF " of the answers were not 2xx or 3xx" > "/dev/stderr"}' <<<"$out"
  echo "$n $(( (u1 - u0) * 1000000 / hz / n )) $(( (s1 - s0) * 1000000 / hz / n ))" \
    "$(awk -v d=$((v1 - v0)) -v n="$n" 'BEGIN {printf "%.2f", d / n}')"
}
