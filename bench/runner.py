"""Running the benchmark: every target, every row, every run; then memory and workers.

Pinning (on a machine with at least two CPUs): the process under test on CPU 0; the upstream
mock, ``wrk``, the SSE client and this orchestrator on CPU 1. The ``--workers`` comparison lets
every process use both CPUs (two workers need both), and is interleaved like a row: each target
with 1 and with 2 workers, all started at once, taking the slices in turn.

Per run, every target is started fresh (all pinned to the same CPU, each idle while another is
measured) and checked (:func:`~bench.targets.probe`); then each row is measured on all of them
**interleaved**: a warm-up of each target at the row's concurrency, then the row's duration cut
into slices (``Options.slices``) that the targets take in turn, A B C A B C ..., each slice between
two CPU samples of the proxy (and the mock). A target's figures for the row are the sums over
its slices (CPU over all its requests; latencies are the median of its slices'). So a drift of
the machine's speed over seconds or minutes, which on a shared VM is larger than the difference
being measured, weighs on every target alike instead of on whichever ran during it. The peak RSS
reported for a row is the process's ``VmHWM`` after it, i.e. the peak so far in that run (rows
run in the order of :data:`ROWS`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from .load import LoadResult, cpu_speed_ms, render_lua, run_sse_client, run_wrk, ttfb_result
from .procstat import (
    TICKS_PER_S,
    core_ticks,
    memory_kb,
    other_share,
    parse_steal_shares,
    read_text,
    sample_cpu,
)
from .sidegate_setup import Configs, render_configs, sidegate_env, workers_supported
from .stats import median
from .summary import Measurement
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

__all__ = ["ROWS", "SECTIONS", "TARGETS", "Options", "Results", "RowSpec", "run"]

TARGETS = ("direct", "passthrough", "sidegate-bare", "sidegate-full")
SECTIONS = ("paced", "memory", "workers")
PACED_EVENTS = 10
PACED_MS = 50.0


@dataclass(frozen=True, slots=True)
class RowSpec:
    """A row: a workload at a concurrency, loaded by wrk, by the SSE client, or both."""

    name: str
    workload: str
    concurrency: int
    wrk: bool = True
    ttfb: bool = False


ROWS = (
    RowSpec("chat-c1", "chat", 1),
    RowSpec("chat-c16", "chat", 16),
    RowSpec("chat-c64", "chat", 64),
    RowSpec("sse-c16", "stream", 16, ttfb=True),
    RowSpec("sse-c1", "stream", 1, wrk=False, ttfb=True),
    RowSpec("embed-c16", "embeddings", 16),
)
"""The rows, in the order they run against each target."""


@dataclass(frozen=True)
class Options:
    """What to run and for how long."""

    duration_s: float = 10.0
    warmup_s: float = 2.0
    runs: int = 2
    slices: int = 5
    """Slices each row's duration is cut into, taken in turn by the targets (at least 1 s each)."""
    sustain_s: float = 60.0
    events: int = 20
    targets: tuple[str, ...] = TARGETS
    rows: tuple[str, ...] = tuple(row.name for row in ROWS)
    sections: tuple[str, ...] = SECTIONS
    floor_loop: str = "asyncio"
    """The passthrough's event loop: ``asyncio`` (the issue's floor) or ``uvloop``."""
    sidegate_loop: str = "auto"
    """``sidegate serve --loop``: ``auto`` (as shipped: uvloop when installed), uvloop, asyncio."""
    proxy_cpus: str | None = "0"
    load_cpus: str | None = "1"
    all_cpus: str | None = "0,1"


@dataclass
class Results:
    """Everything measured, and what the reader must know about it."""

    measurements: list[Measurement] = field(default_factory=list)
    paced: dict[str, dict[str, Any]] = field(default_factory=dict)
    idle_rss_kb: dict[str, list[int]] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    workers: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per sidegate target: access-log lines, and unhandled errors by where they were raised."""
    store_written: bool | None = None
    """Whether sidegate-full wrote its sqlite store (None: not run)."""
    speed: list[dict[str, Any]] = field(default_factory=list)
    """Before each row of each run: ``{"run", "row", "ms"}``, what :mod:`bench.calibrate` took
    on the proxies' CPU (how fast it ran Python then; None when it could not run)."""


@dataclass
class _Context:
    options: Options
    directory: Path
    configs: Configs
    scripts: dict[str, Path]
    say: Callable[[str], None]
    results: Results


def run(options: Options, directory: Path, say: Callable[[str], None] = print) -> Results:
    """Run what ``options`` selects, writing logs and scripts into ``directory``."""
    results = Results()
    scripts = {name: render_lua(workload, directory) for name, workload in WORKLOADS.items()}
    probe_db = directory / "check.db"
    configs = render_configs(directory, sidegate_env("http://127.0.0.1:9", probe_db))
    results.notes.append(f"sidegate-full: {configs.note}")
    ctx = _Context(options, directory, configs, scripts, say, results)
    if options.rows or "paced" in options.sections:
        for index in range(options.runs):
            say(f"run {index + 1}/{options.runs}")
            _one_run(ctx, index)
    if "memory" in options.sections:
        _memory(ctx)
    if "workers" in options.sections:
        if workers_supported():
            for index in range(options.runs):
                _workers(ctx, index)
        else:
            results.notes.append("this sidegate has no `serve --workers`: no scaling figure")
    for path in directory.glob("*.db*"):  # the sessions' sqlite stores: the bench's own spend
        path.unlink()
    return results


def _one_run(ctx: _Context, index: int) -> None:
    options, results = ctx.options, ctx.results
    label = f"run{index + 1}"
    log = ctx.directory / f"upstream-{label}.log"
    upstream = start_upstream(free_port(), cpus=options.load_cpus, log=log, events=options.events)
    live: list[_Live] = []
    try:
        wait_ready(upstream)
        for target in options.targets:
            started = _ready(ctx, target, upstream, label)
            if started is not None:
                live.append(started)
        for row in ROWS:
            if row.name in options.rows and live:
                speed = cpu_speed_ms(options.proxy_cpus)
                results.speed.append({"run": index, "row": row.name, "ms": speed})
                for m in _measure_row(ctx, row, live, index, upstream):
                    results.measurements.append(m)
                    rps = f"{m.rps:,.0f}" if m.rps else "?"
                    cpu = f"{m.cpu_ms:.3f} ms CPU/req" if m.cpu_ms is not None else ""
                    ctx.say(f"    {row.name} {m.target}: {rps} req/s {cpu} {m.detail}".rstrip())
        if "paced" in options.sections and index == 0:
            for one in live:
                results.paced[one.target] = run_sse_client(
                    "paced",
                    one.url + WORKLOADS["stream"].path,
                    options.load_cpus or "0-1",
                    "--events",
                    str(PACED_EVENTS),
                    "--pace-ms",
                    str(PACED_MS),
                )
    finally:
        for one in live:
            if one.process is not None:
                one.process.stop()
                _scan_log(ctx, one.process)
        if "sidegate-full" in options.targets and results.store_written is None:
            db = _db_path(ctx, "sidegate-full", label)
            results.store_written = db.exists() and db.stat().st_size > 0
        upstream.stop()


@dataclass(frozen=True, slots=True)
class _Live:
    """A target started for a run: its process (None for ``direct``) and the URL to load."""

    target: str
    process: Process | None
    url: str


def _ready(ctx: _Context, target: str, upstream: Process, label: str) -> _Live | None:
    """``target`` started and checked, its idle RSS noted; None (a problem noted) if it fails."""
    results = ctx.results
    ctx.say(f"  {target}")
    try:
        process = _start(ctx, target, upstream, label, cpus=ctx.options.proxy_cpus)
    except RuntimeError as exc:
        results.problems.append(f"{target} ({label}) did not start: {exc}")
        return None
    url = process.url if process is not None else upstream.url
    problems = probe(url)
    if problems:
        results.problems.append(f"{target} ({label}) answers wrongly: {'; '.join(problems)}")
        if process is not None:
            process.stop()
            _scan_log(ctx, process)
        return None
    if process is not None:
        rss = memory_kb(process.pid, with_children=process.with_children)
        if rss is not None:
            results.idle_rss_kb.setdefault(target, []).append(rss)
    return _Live(target, process, url)


def _start(
    ctx: _Context,
    target: str,
    upstream: Process,
    label: str,
    *,
    cpus: str | None,
    workers: int = 1,
) -> Process | None:
    """Start ``target`` in front of ``upstream`` (None for ``direct``), ready to measure."""
    if target == "direct":
        return None
    log = ctx.directory / f"{target}-{label}.log"
    if target == "passthrough":
        process = start_passthrough(
            free_port(),
            upstream.url,
            cpus=cpus,
            log=log,
            loop=ctx.options.floor_loop,
            workers=workers,
        )
    else:
        full = target == "sidegate-full"
        db = _db_path(ctx, target, label)
        process = start_sidegate(
            target,
            ctx.configs.full if full else ctx.configs.bare,
            free_port(),
            cpus=cpus,
            log=log,
            log_level="info" if full else "warning",
            env=sidegate_env(upstream.url, db),
            workers=workers,
            loop=ctx.options.sidegate_loop,
        )
    try:
        wait_ready(process)
    except BaseException:
        process.stop()
        raise
    return process


def _db_path(ctx: _Context, target: str, label: str) -> Path:
    return ctx.directory / f"{target}-{label}.db"


def _scan_log(ctx: _Context, process: Process) -> None:
    """Count access-log lines and unhandled errors (by where they were raised) in sidegate's log.

    A big log is then cut to its tail: the access log of a run is tens of megabytes.
    """
    if not process.name.startswith("sidegate"):
        return
    text = process.log.read_text(errors="replace")
    lines = text.splitlines()
    counts = ctx.results.log_counts.setdefault(process.name, {})
    for line in lines:
        if '"event":"request"' in line:
            counts["access-log lines"] = counts.get("access-log lines", 0) + 1
        elif '"unhandled_error"' in line:
            where = _unhandled_where(line)
            counts[where] = counts.get(where, 0) + 1
    if len(text) > 2_000_000:
        process.log.write_text(
            "\n".join(["[... cut by bench: kept the last 200 lines]", *lines[-200:]]) + "\n"
        )


def _unhandled_where(line: str) -> str:
    """``unhandled_error Type at file:line`` of a JSON log line (its innermost sidegate frame)."""
    try:
        event = orjson.loads(line)
        exception = event["exception"][0]
        frames = [f for f in exception["frames"] if "/sidegate/" in f["filename"]]
        frame = frames[-1] if frames else exception["frames"][-1]
        place = f"{frame['filename'].rpartition('/sidegate/')[2]}:{frame['lineno']}"
        return f"unhandled_error {exception['exc_type']} at {place}"
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return "unhandled_error"


def _measure_row(
    ctx: _Context,
    row: RowSpec,
    live: list[_Live],
    index: int,
    upstream: Process,
) -> list[Measurement]:
    """``row`` on every live target, interleaved slice by slice (see the module docstring)."""
    options = ctx.options
    load_cpus = options.load_cpus or "0-1"
    workload = WORKLOADS[row.workload]
    script = ctx.scripts[row.workload]

    def wrk(url: str, seconds: float) -> LoadResult:
        return run_wrk(
            url + workload.path,
            script,
            connections=row.concurrency,
            duration_s=seconds,
            cpus=load_cpus,
        )

    def client(url: str, seconds: float) -> LoadResult:
        data = run_sse_client(
            "ttfb",
            url + workload.path,
            load_cpus,
            "--concurrency",
            str(row.concurrency),
            "--duration",
            str(seconds),
        )
        return ttfb_result(data)

    load = wrk if row.wrk else client
    taken = _interleaved(options, live, load, upstream, _core(options))
    measured = []
    for one, slices_taken in zip(live, taken, strict=True):
        m = _merged(Measurement(row=row.name, target=one.target, run=index), slices_taken)
        if one.process is not None:
            family = one.process.with_children
            m.rss_kb = memory_kb(one.process.pid, with_children=family)
            m.peak_rss_kb = memory_kb(one.process.pid, "VmHWM", with_children=family)
        measured.append(m)
    if row.wrk and row.ttfb:  # time to first byte, from the SSE client, after wrk's slices
        for one, m in zip(live, measured, strict=True):
            timed = client(one.url, options.duration_s / len(live))
            m.ttfb_p50_ms, m.ttfb_p99_ms = timed.ttfb_p50_ms, timed.ttfb_p99_ms
            if timed.errors:
                m.detail = f"{m.detail}; SSE client: {timed.errors} errors {timed.detail}".strip()
    return measured


def _interleaved(
    options: Options,
    live: Sequence[_Live],
    load: Callable[[str, float], LoadResult],
    upstream: Process,
    core: int | None,
) -> list[list[_Slice]]:
    """A warm-up of each of ``live`` (``load(url, seconds)``), then ``options.duration_s`` cut
    into slices that they take in turn, A B C A B C ...; each one's slices, in ``live``'s order."""
    slices = max(1, min(options.slices, math.floor(options.duration_s)))
    slice_s = options.duration_s / slices
    if options.warmup_s > 0:
        for one in live:
            load(one.url, options.warmup_s)
    taken: list[list[_Slice]] = [[] for _ in live]
    for _ in range(slices):
        for one, slices_taken in zip(live, taken, strict=True):
            part = functools.partial(load, one.url, slice_s)
            slices_taken.append(_sampled(part, one.process, upstream, core))
    return taken


def _core(options: Options) -> int | None:
    """The one CPU the proxy is pinned to, if it is pinned to one."""
    cpus = options.proxy_cpus
    return int(cpus) if cpus is not None and cpus.isdigit() else None


@dataclass(frozen=True, slots=True)
class _Slice:
    """One slice of load on one target: what the load saw, and the CPU ticks it cost."""

    result: LoadResult
    proxy_ticks: int | None
    upstream_ticks: int
    core: tuple[int, int] | None
    """Busy and total ticks of the proxy's CPU over the slice (None: not pinned)."""


def _sampled(
    load: Callable[[], LoadResult],
    process: Process | None,
    upstream: Process,
    core: int | None = None,
) -> _Slice:
    """Run ``load`` between two CPU samples of the proxy, of the upstream, and of ``core``.

    ``core`` is the CPU the proxy is pinned to (None: not pinned, no noise figure).
    """
    family = process is not None and process.with_children
    core_before = core_ticks(core) if core is not None else None
    proxy_before = sample_cpu(process.pid, with_children=family) if process else None
    upstream_before = sample_cpu(upstream.pid)
    result = load()
    upstream_after = sample_cpu(upstream.pid)
    proxy_after = sample_cpu(process.pid, with_children=family) if process else None
    core_after = core_ticks(core) if core is not None else None
    return _Slice(
        result,
        proxy_after.ticks - proxy_before.ticks if proxy_after and proxy_before else None,
        upstream_after.ticks - upstream_before.ticks,
        (core_after[0] - core_before[0], core_after[1] - core_before[1])
        if core_after is not None and core_before is not None
        else None,
    )


def _merged(m: Measurement, taken: list[_Slice]) -> Measurement:
    """``m`` with the figures of its slices: sums of requests, errors, time and CPU ticks (so
    CPU per request is over all of them), and the median of the slices' latency percentiles."""
    results = [one.result for one in taken]
    completed = sum(r.requests for r in results)
    duration = sum(r.duration_s for r in results)
    per_s = TICKS_PER_S
    proxy = [one.proxy_ticks for one in taken]
    own = sum(t for t in proxy if t is not None)
    cores = [one.core for one in taken if one.core is not None]
    other = None
    if cores and len(cores) == len(taken):
        share = other_share((0, 0), (sum(c[0] for c in cores), sum(c[1] for c in cores)), own)
        other = share * 100.0 if share is not None else None
    details = sorted({r.detail for r in results if r.detail})
    return replace(
        m,
        requests=completed,
        errors=sum(r.errors for r in results),
        rps=completed / duration if duration > 0 else None,
        p50_ms=median(r.p50_ms for r in results),
        p99_ms=median(r.p99_ms for r in results),
        ttfb_p50_ms=median(r.ttfb_p50_ms for r in results),
        ttfb_p99_ms=median(r.ttfb_p99_ms for r in results),
        cpu_ms=(own * 1000.0 / per_s / completed if completed > 0 and None not in proxy else None),
        upstream_cpu_ms=(
            sum(one.upstream_ticks for one in taken) * 1000.0 / per_s / completed
            if completed > 0
            else None
        ),
        other_cpu_pct=other,
        detail="; ".join(details),
    )


def _memory(ctx: _Context) -> None:
    """sidegate-full: RSS idle, then after each of two sustained mixed loads (no growth)."""
    options, results = ctx.options, ctx.results
    ctx.say(f"memory: sidegate-full, idle then 2 x {options.sustain_s:g} s of load")
    log = ctx.directory / "upstream-memory.log"
    upstream = start_upstream(free_port(), cpus=options.load_cpus, log=log, events=options.events)
    process = None
    try:
        wait_ready(upstream)
        process = _start(ctx, "sidegate-full", upstream, "memory", cpus=options.proxy_cpus)
        assert process is not None
        if probe(process.url):
            results.problems.append("sidegate-full (memory) answers wrongly")
            return
        report: dict[str, Any] = {"target": "sidegate-full", "sustain_s": options.sustain_s}
        report["idle_kb"] = memory_kb(process.pid)
        after = []
        for _ in range(2):
            for name in ("chat", "stream", "embeddings"):
                run_wrk(
                    process.url + WORKLOADS[name].path,
                    ctx.scripts[name],
                    connections=16,
                    duration_s=options.sustain_s / 3,
                    cpus=options.load_cpus or "0-1",
                )
            time.sleep(1.0)
            after.append(memory_kb(process.pid))
        report["after_load_kb"] = after
        report["peak_kb"] = memory_kb(process.pid, "VmHWM")
        results.memory = report
    finally:
        if process is not None:
            process.stop()
            _scan_log(ctx, process)
        upstream.stop()


def _workers(ctx: _Context, index: int) -> None:
    """Each target with 1 and with 2 workers (the floor: 1 and 2 copies sharing its port, for
    what the machine and the load allow), every process free to use both CPUs. All are started
    at once and measured interleaved, like a row's targets (1 worker, 2 workers, the next
    target's 1 and 2, ...), so a drift of the machine's speed weighs on both counts alike."""
    options, results = ctx.options, ctx.results
    cpus = options.all_cpus
    load_cpus = cpus or "0-1"
    log = ctx.directory / f"upstream-workers-run{index + 1}.log"
    upstream = start_upstream(free_port(), cpus=cpus, log=log, events=options.events)
    live: list[_Live] = []
    try:
        wait_ready(upstream)
        for target in options.targets:
            if target == "direct":
                continue
            for count in (1, 2):
                label = f"workers{count}-run{index + 1}"
                process = _start(ctx, target, upstream, label, cpus=cpus, workers=count)
                assert process is not None
                live.append(_Live(target, process, process.url))
        if not live:
            return
        names = ", ".join(dict.fromkeys(one.target for one in live))
        ctx.say(f"workers: {names}, 1 and 2 workers interleaved, chat c=64 (run {index + 1})")
        script = ctx.scripts["chat"]
        path = WORKLOADS["chat"].path

        def load(url: str, seconds: float) -> LoadResult:
            return run_wrk(url + path, script, connections=64, duration_s=seconds, cpus=load_cpus)

        taken = _interleaved(options, live, load, upstream, None)
        for one, slices_taken in zip(live, taken, strict=True):
            assert one.process is not None
            count = one.process.workers
            m = _merged(Measurement(f"workers-{count}", one.target, index), slices_taken)
            results.workers.append(m)
            ctx.say(f"    {one.target}, {count} worker(s): {m.rps or 0:,.0f} req/s")
    finally:
        for one in live:
            if one.process is not None:
                one.process.stop()
                _scan_log(ctx, one.process)
        upstream.stop()


def machine(root: Path = Path("/")) -> dict[str, Any]:
    """Where the figures come from: CPUs, CPU model (and its family and model numbers), kernel,
    how an idle CPU waits, and the share of each CPU's time the hypervisor took since boot.

    ``idle`` is the ``cpuidle`` driver (None without one: the kernel then writes ``none``),
    ``guest_halt_poll_ns`` only with the ``haltpoll`` driver (the module's parameter governs
    nothing under another; VM Q had it at 200000 with no driver), and ``halts``: whether an idle
    CPU halts at once — ``haltpoll`` with a poll of 0, or no driver on an x86 CPU without
    ``monitor`` (the kernel's default idle is then ``HLT``), else None (not known). Waking a
    halted CPU costs the woken process CPU of its own (*VM P* in bench/HISTORY.md: at one
    request at a time, 50–75 µs a request, a quarter of the floor's CPU, against halt polling
    on). ``root`` is for tests.
    """
    info: dict[str, str] = {}
    for line in (read_text(root / "proc/cpuinfo") or "").splitlines():  # the first CPU's fields
        name, _, value = line.partition(":")
        info.setdefault(name.strip(), value.strip())
    uname = os.uname()
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": info.get("model name", "?"),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "idle": _idle(root, info),
        "steal_since_boot": parse_steal_shares(read_text(root / "proc/stat") or ""),
        "kernel": f"{uname.sysname} {uname.release}",
        "machine": uname.machine,
    }


def _idle(root: Path, cpu: dict[str, str]) -> dict[str, Any]:
    """How an idle CPU waits (see :func:`machine`)."""
    driver = read_text(root / "sys/devices/system/cpu/cpuidle/current_driver")
    driver = None if driver == "none" else driver
    poll = None
    halts = None
    if driver == "haltpoll":
        poll = read_text(root / "sys/module/haltpoll/parameters/guest_halt_poll_ns")
        halts = True if poll == "0" else None
    elif driver is None and "flags" in cpu and "monitor" not in cpu["flags"].split():
        halts = True
    return {"driver": driver, "guest_halt_poll_ns": poll, "halts": halts}
