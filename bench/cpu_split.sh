#!/bin/bash
# User and system CPU per request of the floor, bare and full, side by side (chat, c=16 unless
# C says otherwise).
#
#   bench/cpu_split.sh [ROUNDS [SECONDS [C]]]
#
# Starts the benchmark's mock upstream (CPU 1) and the three proxies (all on CPU 0, as
# bench/instructions.sh runs them), then for each round sends wrk load to each in turn (1 s to
# warm up, SECONDS measured, default 6) and prints utime and stime of /proc/<pid>/stat over the
# requests completed, in µs, and how often a request the proxy's main thread went to sleep.
# Where a CPU ratio runs above the instruction ratio, this says whether the kernel's share is
# why; at c=1 (C=1) the sleeps say how many idle wake-ups a request costs. Each round starts by
# timing python -m bench.calibrate on CPU 0: how fast the machine was then. LOGLEVEL sets the
# full chain's level (info); FLOOR_LOOP (asyncio) and SIDEGATE_LOOP (auto) the event loops.
# Needs wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}; SECONDS_=${2:-6}; C=${3:-16}
source bench/common.sh
taskset -c 1 $PY -m bench.upstream --port "$UP" >"$WORK/upstream.log" 2>&1 &
taskset -c 0 $PY -m bench.passthrough --port "$PORT" --upstream "$BENCH_UPSTREAM" \
  --loop "${FLOOR_LOOP:-asyncio}" >/dev/null 2>&1 &
FLOOR=$!
taskset -c 0 .venv/bin/sidegate serve --config "$BENCH_BARE" --port $((PORT + 1)) \
  --log-level warning --log-format json --loop "${SIDEGATE_LOOP:-auto}" >/dev/null 2>&1 &
BARE=$!
taskset -c 0 .venv/bin/sidegate serve --config "$BENCH_FULL" --port $((PORT + 2)) \
  --log-level "${LOGLEVEL:-info}" --log-format json --loop "${SIDEGATE_LOOP:-auto}" \
  2>"$WORK/full.log" &
FULL=$!
for port in "$PORT" $((PORT + 1)) $((PORT + 2)); do wait_for "$port"; done
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round: CPU 0 ran the calibration loop in $(speed_ms) ms"
  for target in "floor $FLOOR $PORT" "bare $BARE $((PORT + 1))" "full $FULL $((PORT + 2))"; do
    set -- $target
    read -r n user system sleeps < <(cpu_per_request "$2" "$3" "$C" "$SECONDS_")
    echo "round $round $1: $n requests, user $user µs, system $system µs, $sleeps sleeps a request"
  done
done
