#!/bin/bash
# User and system CPU per request of the floor, bare and full, side by side (chat, c=16).
#
#   bench/cpu_split.sh [ROUNDS [SECONDS]]
#
# Starts the benchmark's mock upstream (CPU 1) and the three proxies (all on CPU 0, as
# bench/instructions.sh configures them), then for each round sends wrk load to each in turn
# (1 s to warm up, SECONDS measured, default 6) and prints utime and stime of /proc/<pid>/stat
# over the requests completed, in µs. Where a CPU ratio runs above the instruction ratio, this
# says whether the kernel's share is why. Needs wrk and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}; SECONDS_=${2:-6}
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
UP=$((25000 + RANDOM % 5000)); BASE=$((20000 + RANDOM % 4000))
export BENCH_UPSTREAM=http://127.0.0.1:$UP BENCH_DB=$WORK/db.sqlite
BENCH_KEY_HASH=sha256:$($PY -c "import hashlib; from bench.workloads import BENCH_KEY; print(hashlib.sha256(BENCH_KEY.encode()).hexdigest())")
export BENCH_KEY_HASH
$PY -c "
import sys, yaml
from bench.sidegate_setup import deep_merge, _load
yaml.safe_dump(deep_merge(_load('full.yaml'), _load('limits.yaml')), open(sys.argv[1], 'w'), sort_keys=False)
" "$WORK/full.yaml"
$PY -c "
import sys
from bench.workloads import BENCH_KEY, CHAT_BODY
open(sys.argv[1], 'w').write(
    'wrk.method = \"POST\"\nwrk.body = [==[' + CHAT_BODY.decode() + ']==]\n'
    'wrk.headers[\"Content-Type\"] = \"application/json\"\n'
    'wrk.headers[\"Authorization\"] = \"Bearer ' + BENCH_KEY + '\"\n')
" "$WORK/chat.lua"
taskset -c 1 $PY -m bench.upstream --port "$UP" >"$WORK/upstream.log" 2>&1 &
taskset -c 0 $PY -m bench.passthrough --port "$BASE" --upstream "$BENCH_UPSTREAM" >/dev/null 2>&1 &
FLOOR=$!
taskset -c 0 .venv/bin/sidegate serve --config bench/configs/bare.yaml --port $((BASE + 1)) \
  --log-level warning --log-format json >/dev/null 2>&1 &
BARE=$!
taskset -c 0 .venv/bin/sidegate serve --config "$WORK/full.yaml" --port $((BASE + 2)) \
  --log-level info --log-format json 2>"$WORK/full.log" &
FULL=$!
for port in "$BASE" $((BASE + 1)) $((BASE + 2)); do
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
done
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
  for target in "floor $FLOOR $BASE" "bare $BARE $((BASE + 1))" "full $FULL $((BASE + 2))"; do
    set -- $target
    URL=http://127.0.0.1:$3/v1/chat/completions
    taskset -c 1 wrk -t1 -c16 -d1s -s "$WORK/chat.lua" "$URL" >/dev/null
    read -r u0 s0 < <(ticks "$2")
    n=$(taskset -c 1 wrk -t1 -c16 -d"${SECONDS_}s" -s "$WORK/chat.lua" "$URL" | awk '/requests in/ {print $1}')
    read -r u1 s1 < <(ticks "$2")
    echo "round $round $1: $n requests, user $(( (u1 - u0) * 1000000 / HZ / n )) µs, system $(( (s1 - s0) * 1000000 / HZ / n )) µs a request"
  done
done
