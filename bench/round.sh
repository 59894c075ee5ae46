#!/bin/bash
# A VM's round: every command a VM block of the README names, one after the other, in its order
# (about 80 minutes on a 2-CPU VM). Before each, a line "=== HH:MM:SS COMMAND" and CPU 0's and
# CPU 1's lines of /proc/stat (steal is their eighth figure); each `python -m bench` writes its
# results directory under bench/results/ as ever.
#
#   bench/round.sh >round.log 2>&1
#   DRY=1 bench/round.sh                  # the commands only, one a line
#
# Two sets of three chat invocations with the diagnoses between them, the second set an hour on
# from the first: `python -m bench.pool` over the six chat directories gives a VM's figures over
# all 18 runs, `python -m bench.pool --markdown` each set's table. A command that fails is
# reported and the round goes on. A third `--workers` invocation, when the six planned runs leave
# the goal in doubt, is run by hand after it. Needs wrk, valgrind and py-spy (in the venv:
# `.venv/bin/pip install py-spy`).
set -uo pipefail
cd "$(dirname "$0")/.."
CHAT="python -m bench --only passthrough,sidegate-bare,sidegate-full,chat-c1,chat-c16,chat-c64,sse-c16 --runs 3"
COMMANDS=(
  "$CHAT"
  "$CHAT"
  "$CHAT"
  "python -m bench --only passthrough,sidegate-bare,sidegate-full,sse-c1,workers,memory,paced --runs 3"
  "python -m bench --only passthrough,sidegate-bare,sidegate-full,sse-c1,workers --runs 3"
  "python -m bench.embeddings_cache"
  "python -m bench.embeddings_cache"
  "python -m bench.limits_micro 20000"
  "python -m bench.limits_micro 20000 --sqlite"
  "bench/cpu_split.sh 3 5 1"
  "BUSY=1 bench/cpu_split.sh 3 5 1"
  "bench/cpu_split.sh 6 5 16"
  "bench/knockouts.sh 6 4 16 full limits access_log ratelimit_headers"
  "python -m bench --profile --only passthrough,sidegate-bare,sidegate-full,chat-c16 --duration 15"
  "bench/instructions.sh passthrough 1500 16"
  "bench/instructions.sh bare 1500 16"
  "bench/instructions.sh full 1500 16"
  "CACHESIM=1 bench/instructions.sh passthrough 1000 16"
  "CACHESIM=1 bench/instructions.sh bare 1000 16"
  "$CHAT"
  "$CHAT"
  "$CHAT"
  "bench/knockouts.sh 6 4 1 full limits access_log ratelimit_headers"
  "WITHOUT=access_log bench/instructions.sh full 1500 16"
  "WITHOUT=limits bench/instructions.sh full 1500 16"
  "python -m bench --profile --only passthrough,sidegate-full,chat-c1 --duration 20"
)
failed=0
for command in "${COMMANDS[@]}"; do
  if [ -n "${DRY:-}" ]; then
    echo "$command"
    continue
  fi
  echo "=== $(date -u +%T) $command"
  grep -E '^cpu[01] ' /proc/stat
  # the venv's python first on the PATH: the commands read as the README writes them
  if ! PATH="$PWD/.venv/bin:$PATH" bash -c "$command"; then
    echo "=== $(date -u +%T) FAILED: $command"
    failed=$((failed + 1))
  fi
done
[ -n "${DRY:-}" ] || echo "=== $(date -u +%T) round done, $failed command(s) failed"
[ "$failed" -eq 0 ]
