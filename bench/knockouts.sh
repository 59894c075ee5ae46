#!/bin/bash
# CPU per request of the floor, of sidegate as shipped, and of sidegate without some of its
# parts (python -m bench.knockout), interleaved round by round; the medians at the end.
#
#   bench/knockouts.sh ROUNDS SECONDS C bare|full PARTS [PARTS ...]
#
# e.g. bench/knockouts.sh 8 5 16 bare access_log ratelimit_headers retry
#      bench/knockouts.sh 8 4 16 bare tree=../before    # this checkout against another one
# Each PARTS (comma-separated) is one more process, or, as tree=DIR, sidegate as shipped from
# another checkout of this repository (a git worktree of an earlier commit, say) run with this
# checkout's venv: an A/B of two commits. All run on CPU 0 (the mock and wrk on CPU 1),
# each loaded in turn for SECONDS after a 1 s warm-up, and its utime + stime over the requests it
# completed is its CPU per request. FLOOR_LOOP (asyncio) and SIDEGATE_LOOP (auto) choose the
# event loops; LOGLEVEL the chain's level (bare: warning, full: info). The summary gives each
# process's median (and how often a request its main thread went to sleep: at c=1 each sleep is
# an idle CPU woken again) and, for each one added, the median of its round-by-round difference to
# sidegate as shipped (with the range): the figure to read on a machine that drifts. RESTART=N
# starts every process afresh each N rounds (default 0: never). Each round starts by timing
# python -m bench.calibrate on CPU 0 (speed_ms), and the summary gives the range: a round much
# slower than the others ran on a slower machine, and its differences are the ones to trust, not
# its absolute figures. A process keeps its speed
# relative to another for as long as it runs (address layout, hash seeds): one set of processes
# can differ from the next by more than a change, so an A/B wants several, e.g. RESTART=2 with
# 12 rounds compares six pairs. Needs wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=$1; SECONDS_=$2; C=$3; CHAIN=$4; shift 4
source bench/common.sh
case $CHAIN in
  bare) CONFIG=$BENCH_BARE LEVEL=${LOGLEVEL:-warning} ;;
  full) CONFIG=$BENCH_FULL LEVEL=${LOGLEVEL:-info} ;;
  *) echo "knockouts.sh: the chain is bare or full, not $CHAIN" >&2; exit 2 ;;
esac
taskset -c 1 $PY -m bench.upstream --port "$UP" >"$WORK/upstream.log" 2>&1 &
SERVE=(--config "$CONFIG" --log-level "$LEVEL" --log-format json --loop "${SIDEGATE_LOOP:-auto}")
NAMES=(floor "$CHAIN")
for parts in "$@"; do
  if [[ $parts == tree=* ]]; then NAMES+=("${parts#tree=}"); else NAMES+=("without $parts"); fi
done
PIDS=()
start_all() {  # the floor, sidegate as shipped, then one process per PARTS, on ports from PORT
  PIDS=()
  taskset -c 0 $PY -m bench.passthrough --port "$PORT" --upstream "$BENCH_UPSTREAM" \
    --loop "${FLOOR_LOOP:-asyncio}" >/dev/null 2>&1 &
  PIDS+=($!)
  taskset -c 0 .venv/bin/sidegate serve "${SERVE[@]}" --port $((PORT + 1)) 2>>"$WORK/$CHAIN.log" &
  PIDS+=($!)
  local port parts
  for parts in "$@"; do
    port=$((PORT + ${#PIDS[@]}))
    if [[ $parts == tree=* ]]; then  # the package from DIR first on the path (a script's sys.path)
      PYTHONPATH=${parts#tree=} taskset -c 0 .venv/bin/sidegate serve "${SERVE[@]}" --port "$port" \
        2>>"$WORK/tree-${#PIDS[@]}.log" &
    else
      taskset -c 0 $PY -m bench.knockout "$parts" -- "${SERVE[@]}" --port "$port" \
        2>>"$WORK/without-$parts.log" &
    fi
    PIDS+=($!)
  done
  for i in "${!PIDS[@]}"; do wait_for $((PORT + i)); done
}
stop_all() {
  [ ${#PIDS[@]} -eq 0 ] && return 0
  kill "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}
for round in $(seq 1 "$ROUNDS"); do
  if [ ${#PIDS[@]} -eq 0 ] || { [ "${RESTART:-0}" -gt 0 ] && [ $(( (round - 1) % RESTART )) -eq 0 ] && [ "$round" -gt 1 ]; }; then
    stop_all
    start_all "$@"
  fi
  speed=$(speed_ms)
  echo "$speed" >>"$WORK/speeds"
  echo "round $round: CPU 0 ran the calibration loop in $speed ms"
  for i in "${!NAMES[@]}"; do
    read -r _ user system sleeps < <(cpu_per_request "${PIDS[$i]}" $((PORT + i)) "$C" "$SECONDS_")
    printf 'round %s\t%s\t%s\t%s\n' "$round" "${NAMES[$i]}" "$((user + system))" "$sleeps" \
      >>"$WORK/rounds.tsv"
    echo "round $round: ${NAMES[$i]}: $((user + system)) µs, $sleeps sleeps a request"
  done
done
stop_all
# The calibration loop's range; medians per process, each as a multiple of the floor's.
$PY - "$WORK/rounds.tsv" "$WORK/speeds" <<'PYTHON'
import statistics, sys
speeds = [float(line) for line in open(sys.argv[2])]
print(f"CPU 0 ran the calibration loop in {min(speeds)} to {max(speeds)} ms over the rounds")
rows, sleeps = {}, {}
for line in open(sys.argv[1]):
    _, name, us, slept = line.rstrip("\n").split("\t")
    rows.setdefault(name, []).append(int(us))
    sleeps.setdefault(name, []).append(float(slept))
names = list(rows)
floor = statistics.median(rows["floor"])
shipped = rows[names[1]]
for name, values in rows.items():
    median = statistics.median(values)
    print(
        f"median {name}: {median:.0f} µs a request, {median / floor:.2f}x the floor; "
        f"{statistics.median(sleeps[name]):.2f} sleeps a request"
    )
for name in names[2:]:
    changes = [other - ours for ours, other in zip(shipped, rows[name], strict=True)]
    print(
        f"change, {name} against {names[1]} round by round: median "
        f"{statistics.median(changes):+.0f} µs ({min(changes):+d} … {max(changes):+d})"
    )
PYTHON
