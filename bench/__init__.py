"""sidegate's benchmark harness: ``python -m bench`` (or ``make bench``) runs everything.

The pieces, each runnable on its own:

* :mod:`bench.upstream` — a zero-latency Meridian-style upstream with precomputed answers
  (``python -m bench.upstream --port 9300``);
* :mod:`bench.passthrough` — the floor: a ~60-line aiohttp reverse proxy;
* :mod:`bench.wrk` — ``wrk`` with a Lua script per POST workload (:mod:`bench.lua`);
* :mod:`bench.sse_client` — an aiohttp client timing the first SSE byte, and the paced check;
* :mod:`bench.procstat` — CPU time and RSS of a process from ``/proc``;
* :mod:`bench.runner` — starts each target pinned with ``taskset`` and measures every row;
* :mod:`bench.report` — the table and the JSON under ``bench/results/``.
"""
