"""Where the CPU goes: py-spy samples of a target under load, summed up by package and function.

``python -m bench --profile`` records each selected sidegate target (and the floor, for
comparison) under wrk with ``py-spy record --format raw`` (collapsed stacks: open them with
speedscope or flamegraph.pl) and prints, per row, the share of on-CPU samples by package, the
functions with the most self time, and the same for sidegate's own code. Profiling slows the
process; its figures are never mixed with the measured rows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .load import render_lua, run_wrk
from .report import render_table
from .runner import Options
from .sidegate_setup import render_configs, sidegate_env
from .targets import (
    Process,
    free_port,
    probe,
    start_passthrough,
    start_sidegate,
    start_upstream,
    wait_ready,
)
from .workloads import WORKLOADS

__all__ = ["PY_SPY", "Profile", "package_of", "parse_collapsed", "profile"]

PY_SPY = Path(sys.executable).with_name("py-spy")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_PACKAGES = (
    ("sidegate/", "sidegate"),
    ("aiohttp/", "aiohttp"),
    ("structlog/", "structlog"),
    ("multidict/", "multidict/yarl"),
    ("yarl/", "multidict/yarl"),
    ("propcache/", "multidict/yarl"),
    ("asyncio/", "asyncio"),
    ("selectors.py", "asyncio"),
    ("bench/", "bench"),
    ("prometheus_client/", "prometheus_client"),
    ("pydantic", "pydantic"),
)


def package_of(file: str) -> str:
    """The package a py-spy frame's (shortened) file belongs to."""
    for prefix, name in _PACKAGES:
        if file.startswith(prefix) or f"/{prefix}" in file:
            return name
    return "python stdlib/other"


@dataclass
class Profile:
    """On-CPU samples, by package and by function (self time: the innermost frame)."""

    samples: int = 0
    packages: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)


def parse_collapsed(text: str) -> Profile:
    """Sum py-spy's raw output (``frame;...;frame count``, root first) by the last frame."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        match = _FRAME.match(stack.rpartition(";")[2])
        if match is None or not count_text.isdigit():
            continue
        count = int(count_text)
        profile.samples += count
        profile.packages[package_of(match["file"])] += count
        profile.self_time[f"{match['func']} ({match['file']})"] += count
    return profile


def _share(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "—"


def render_profile(title: str, profile: Profile, top: int = 12) -> str:
    total = profile.samples
    parts = [f"#### {title}: {total} on-CPU samples", ""]
    parts.append(
        render_table(
            ["package (self time)", "share"],
            [[name, _share(count, total)] for name, count in profile.packages.most_common()],
        )
    )
    parts += [
        "",
        render_table(
            ["function (self time)", "share"],
            [[name, _share(count, total)] for name, count in profile.self_time.most_common(top)],
        ),
    ]
    ours = [(n, c) for n, c in profile.self_time.most_common() if "(sidegate/" in n][:top]
    if ours:
        parts += [
            "",
            render_table(
                ["sidegate's own code (self time)", "share"],
                [[name, _share(count, total)] for name, count in ours],
            ),
        ]
    return "\n".join(parts)


def _record(
    process: Process, seconds: float, output: Path, cpus: str | None
) -> subprocess.Popen[bytes]:
    command = [
        str(PY_SPY),
        "record",
        "--pid",
        str(process.pid),
        "--duration",
        f"{seconds:g}",
        "--rate",
        "200",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(output),
    ]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile(
    options: Options,
    directory: Path,
    rows: tuple[str, ...],
    say: Callable[[str], None] = print,
) -> str:
    """Profile ``options.targets`` (except ``direct``) on ``rows``; returns the report."""
    scripts = {name: render_lua(workload, directory) for name, workload in WORKLOADS.items()}
    configs = render_configs(directory, sidegate_env("http://127.0.0.1:9", directory / "c.db"))
    load_cpus = options.load_cpus or "0-1"
    sections = []
    upstream = start_upstream(
        free_port(),
        cpus=options.load_cpus,
        log=directory / "upstream-profile.log",
        events=options.events,
    )
    try:
        wait_ready(upstream)
        for target in options.targets:
            if target == "direct":
                continue
            log = directory / f"{target}-profile.log"
            if target == "passthrough":
                process = start_passthrough(
                    free_port(),
                    upstream.url,
                    cpus=options.proxy_cpus,
                    log=log,
                    loop=options.floor_loop,
                )
            else:
                full = target == "sidegate-full"
                process = start_sidegate(
                    target,
                    configs.full if full else configs.bare,
                    free_port(),
                    cpus=options.proxy_cpus,
                    log=log,
                    log_level="info" if full else "warning",
                    env=sidegate_env(upstream.url, directory / f"{target}-profile.db"),
                    loop=options.sidegate_loop,
                )
            try:
                wait_ready(process)
                if problems := probe(process.url):
                    raise RuntimeError(f"{target} answers wrongly: {problems}")
                for row in rows:
                    name, _, concurrency = row.partition("-c")
                    workload = {"chat": "chat", "sse": "stream", "embed": "embeddings"}[name]
                    endpoint = process.url + WORKLOADS[workload].path
                    say(f"profiling {target} {row}")
                    run_wrk(
                        endpoint,
                        scripts[workload],
                        connections=int(concurrency),
                        duration_s=options.warmup_s,
                        cpus=load_cpus,
                    )
                    output = directory / f"profile-{target}-{row}.txt"
                    spy = _record(process, options.duration_s, output, options.load_cpus)
                    run_wrk(
                        endpoint,
                        scripts[workload],
                        connections=int(concurrency),
                        duration_s=options.duration_s,
                        cpus=load_cpus,
                    )
                    _, err = spy.communicate(timeout=options.duration_s + 60)
                    if spy.returncode != 0 or not output.exists():
                        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
                    summary = parse_collapsed(output.read_text())
                    sections.append(render_profile(f"{target}, {row}", summary))
            finally:
                process.stop()
    finally:
        upstream.stop()
    return "\n\n".join(["### Profiles (py-spy, on-CPU samples only)", *sections])
