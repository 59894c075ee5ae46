"""Load generators, each a subprocess pinned to the load core: ``wrk`` and the SSE client.

``wrk`` sends the POST workloads from a Lua script rendered from ``bench/lua/post.lua`` (the
rendered scripts are kept in the run's directory, so a row can be rerun by hand); its ``done()``
prints one ``BENCH_RESULT {...}`` JSON line, parsed by :func:`parse_wrk_output`.
"""

from __future__ import annotations

import math
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .targets import REPO
from .workloads import BENCH_KEY, Workload

__all__ = [
    "LoadResult",
    "parse_wrk_output",
    "render_lua",
    "run_sse_client",
    "run_wrk",
    "ttfb_result",
]

_LUA_TEMPLATE = Path(__file__).with_name("lua") / "post.lua"
_MARK = "BENCH_RESULT "


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load generator saw: completed requests, errors, throughput, latency in ms."""

    requests: int
    errors: int
    duration_s: float
    p50_ms: float | None
    p99_ms: float | None
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    detail: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def render_lua(workload: Workload, directory: Path) -> Path:
    """Write the wrk script of ``workload`` into ``directory``; returns its path."""
    body = workload.body.decode()
    if "]==]" in body:
        raise ValueError("the body would end the Lua long string early")
    text = string.Template(_LUA_TEMPLATE.read_text()).substitute(
        NAME=workload.name, PATH=workload.path, BODY=body, KEY=BENCH_KEY
    )
    path = directory / f"wrk-{workload.name}.lua"
    path.write_text(text)
    return path


def parse_wrk_output(output: str) -> LoadResult:
    """The :class:`LoadResult` from wrk's output with the ``BENCH_RESULT`` line of post.lua."""
    for line in output.splitlines():
        if line.startswith(_MARK):
            data: dict[str, Any] = orjson.loads(line[len(_MARK) :])
            break
    else:
        raise ValueError(f"no {_MARK.strip()} line in wrk's output:\n{output}")
    errors = data["errors"]
    latency = data["latency_us"]
    failed = sum(errors.values())
    detail = ", ".join(f"{kind} {count}" for kind, count in errors.items() if count)
    return LoadResult(
        requests=int(data["requests"]),
        errors=failed,
        duration_s=data["duration_us"] / 1e6,
        p50_ms=latency["p50"] / 1000.0,
        p99_ms=latency["p99"] / 1000.0,
        detail=detail,
    )


def run_wrk(
    url: str, script: Path, *, connections: int, duration_s: float, cpus: str
) -> LoadResult:
    """``wrk`` (one thread) against ``url`` with ``script``, pinned to ``cpus``.

    wrk takes whole seconds: ``duration_s`` is rounded up (at least 1 s).
    """
    seconds = max(1, math.ceil(duration_s))
    command = [
        "taskset",
        "-c",
        cpus,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk_output(done.stdout)


def run_sse_client(mode: str, url: str, cpus: str, *options: str) -> dict[str, Any]:
    """Run :mod:`bench.sse_client` pinned to ``cpus``; returns the JSON it printed."""
    command = ["taskset", "-c", cpus, sys.executable, "-m", "bench.sse_client", mode]
    command += ["--url", url, *options]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, cwd=REPO
    )
    if done.returncode != 0:
        raise RuntimeError(f"the SSE client failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def cpu_speed_ms(cpus: str | None) -> float | None:
    """:mod:`bench.calibrate` on ``cpus`` (None: unpinned): the milliseconds its fixed Python
    work took there, or None when it could not run."""
    command = [sys.executable, "-m", "bench.calibrate"]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=True, cwd=REPO
        )
        return float(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def ttfb_result(data: dict[str, Any]) -> LoadResult:
    """A :class:`LoadResult` from the JSON of ``bench.sse_client ttfb``."""
    return LoadResult(
        requests=int(data["requests"]),
        errors=int(data["errors"]),
        duration_s=float(data["duration_s"]),
        p50_ms=data["latency_ms"]["p50"],
        p99_ms=data["latency_ms"]["p99"],
        ttfb_p50_ms=data["ttfb_ms"]["p50"],
        ttfb_p99_ms=data["ttfb_ms"]["p99"],
        detail=data.get("first_error") or "",
    )
