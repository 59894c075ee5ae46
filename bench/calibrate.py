"""``python -m bench.calibrate``: how fast this CPU runs Python right now.

Prints the CPU milliseconds a fixed piece of interpreter work takes (dict stores, string
formatting, integer arithmetic: the kind of work a proxy's Python does), the best of three. The
harness runs it on the proxies' CPU before every row of every run: a VM's speed can change within
an invocation with nothing in the guest's own accounting to show it (VM Q's round, bench/HISTORY.md:
from one minute to the next the same processes spent twice the CPU a request, with no time stolen
by the hypervisor on record), and the spread of these figures over an invocation says whether its
rows' absolute figures can be set side by side. The ratios, taken within a run from interleaved
slices, are what such a change leaves alone.
"""

from __future__ import annotations

import time

__all__ = ["measure"]

LOOPS = 100_000
ROUNDS = 3


def _work(loops: int) -> int:
    total = 0
    seen: dict[int, str] = {}
    for i in range(loops):
        key = i & 255
        seen[key] = f"{key}:{total}"
        total += len(seen[key])
    return total


def measure(loops: int = LOOPS, rounds: int = ROUNDS) -> float:
    """The CPU milliseconds ``loops`` turns of the fixed work take, the best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        _work(loops)
        best = min(best, time.process_time() - started)
    return best * 1000.0


def main() -> int:
    print(f"{measure():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
