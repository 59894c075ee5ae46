#!/bin/bash
# Instructions per request of one proxy, counted by valgrind (callgrind): steadier than CPU time
# on a noisy machine (repeats to about 0.5%), though it leaves out the kernel's work.
#
#   bench/instructions.sh passthrough|bare|full|CONFIG.yaml [N [C [stream]]]
#
# Starts the benchmark's mock upstream (CPU 1) and the proxy under callgrind (CPU 0), sends 300
# requests to warm up, counts the next N (default 400) at concurrency C (default 16), and prints
# instructions per request. bare runs bench/configs/bare.yaml at --log-level warning; full runs
# full.yaml with limits.yaml merged in, at info; LOGLEVEL overrides. KEEP=DIR copies callgrind's
# output files there (for callgrind_annotate). FLOOR_LOOP (asyncio) and SIDEGATE_LOOP (auto: as
# shipped, uvloop when installed) choose the event loops. CACHESIM=1 also simulates the caches
# and branch predictors and prints every event per request (Ir, I1mr, D1mr, Bcm, Bim ...): where
# a CPU ratio runs above the instruction ratio, these say whether misses grow faster.
# WITHOUT=PARTS (comma-separated, as bench/knockouts.sh takes them: access_log, limits, retry ...)
# runs sidegate with those parts taken out (python -m bench.knockout): the difference from the
# count without WITHOUT is what the parts' instructions are. Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=$1; N=${2:-400}; C=${3:-16}; STREAM=${4:-}
source bench/common.sh
case $TARGET in
  passthrough) COMMAND=($PY -m bench.passthrough --port "$PORT" --upstream "$BENCH_UPSTREAM"
                        --loop "${FLOOR_LOOP:-asyncio}") ;;
  bare) CONFIG=$BENCH_BARE LEVEL=${LOGLEVEL:-warning} ;;
  full) CONFIG=$BENCH_FULL LEVEL=${LOGLEVEL:-info} ;;
  *) CONFIG=$TARGET LEVEL=${LOGLEVEL:-info} ;;
esac
if [ "$TARGET" = passthrough ] && [ -n "${WITHOUT:-}" ]; then
  echo "instructions.sh: WITHOUT takes parts out of sidegate; the floor has none" >&2; exit 2
fi
if [ "$TARGET" != passthrough ]; then
  SERVE=(--config "$CONFIG" --port "$PORT" --log-level "$LEVEL" --log-format json
         --loop "${SIDEGATE_LOOP:-auto}")
  if [ -n "${WITHOUT:-}" ]; then COMMAND=($PY -m bench.knockout "$WITHOUT" -- "${SERVE[@]}")
  else COMMAND=(.venv/bin/sidegate serve "${SERVE[@]}"); fi
fi
taskset -c 1 $PY -m bench.upstream --port "$UP" >"$WORK/upstream.log" 2>&1 &
SIM=(); [ -n "${CACHESIM:-}" ] && SIM=(--cache-sim=yes --branch-sim=yes)
taskset -c 0 valgrind --tool=callgrind --instr-atstart=no "${SIM[@]}" --callgrind-out-file="$WORK/cg.out" \
  "${COMMAND[@]}" >"$WORK/proxy.log" 2>&1 &
PROXY=$!
wait_for "$PORT"
URL=http://127.0.0.1:$PORT/v1/chat/completions
taskset -c 1 $PY -m bench.fixed_load "$URL" 300 "$C" $STREAM
callgrind_control -i on $PROXY >/dev/null
taskset -c 1 $PY -m bench.fixed_load "$URL" "$N" "$C" $STREAM
callgrind_control -d $PROXY >/dev/null
callgrind_control -i off $PROXY >/dev/null  # what runs after the dump (shutdown) is not counted
kill $PROXY; wait $PROXY 2>/dev/null || true
# Each part callgrind wrote (the dump, and the few instructions before counting went off) has a
# totals: line per event; sum them (a part's summary: line is not a count to add: the last part's
# is the difference from the dump, which can wrap round below zero).
EVENTS=$(grep -h "^events:" "$WORK"/cg.out* | head -1 | cut -d' ' -f2-)
SUMS=$(grep -h "^totals:" "$WORK"/cg.out* | awk '{for (i = 2; i <= NF; i++) s[i] += $i}
  END {for (i = 2; i <= NF; i++) printf "%.0f%s", s[i], (i < NF ? " " : "\n")}')
TOTAL=${SUMS%% *}
echo "$TARGET${WITHOUT:+ without $WITHOUT}: $((TOTAL / N)) instructions per request ($N requests, concurrency $C${STREAM:+, streamed})"
if [ -n "${CACHESIM:-}" ]; then  # every event, per request
  echo "$SUMS" | awk -v names="$EVENTS" -v n="$N" \
    '{split(names, e, " "); for (i = 1; i <= NF; i++) printf "%s %.0f%s", e[i], $i / n, (i < NF ? ", " : "\n")}'
fi
