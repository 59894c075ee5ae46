"""The report: Markdown tables (for the terminal and the README) and the JSON of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .calibrate import ROUNDS as CALIBRATION_ROUNDS
from .runner import ROWS, TARGETS, Results
from .stats import median, ratio
from .summary import FLOOR, Aggregate, aggregate, workers_scales

__all__ = [
    "CPU_GOALS",
    "WORKERS_GOAL",
    "fmt",
    "meets",
    "render",
    "render_table",
    "steal_shares",
    "summary_json",
    "verdicts",
]

_MB = 1024.0
_SIDEGATE = ("sidegate-bare", "sidegate-full")
"""sidegate's two targets, in the order the verdicts give each goal for them."""
CPU_GOALS = dict(zip(_SIDEGATE, (1.2, 2.0), strict=True))
"""The issue's lines: CPU a request at most this many times the floor's, per sidegate target."""
_CPU_VERDICT_ROWS = ("chat-c1", "chat-c16", "chat-c64", "sse-c16", "sse-c1", "embed-c16")
"""The rows both targets' CPU goals are judged on in one invocation's verdicts, in that order. The
issue states the full chain's goal on chat and on streaming and bare's without a row; bare's is held
on every row too, as the README's *Where it stands* and ``bench.pool`` hold it."""
WORKERS_GOAL = 1.6
"""The issue's line for ``--workers 2``: at least this many times one worker's requests/s."""
NOISY_PCT = 10.0
"""A row whose proxy CPU spent this much (percent) on other work is flagged as noisy."""
SPEED_SPREAD = 0.15
"""A change this large (a share) in how fast the proxies' CPU ran Python within an invocation
is noted (VM Q's round saw it halve, with no steal on record)."""


def meets(value: float, line: float, at_most: bool = True) -> bool:
    """Whether a figure is on the goal's side of its line: at most the line (CPU, memory, first
    byte) or, with ``at_most=False``, at least it (``--workers 2``). One invocation's verdicts and
    ``bench.pool``'s count of runs on the wrong side both judge by it."""
    return value <= line if at_most else value >= line


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    """A number for a table cell, ``—`` when there is none."""
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table padded for reading in a terminal; text left, everything else right."""
    widths = [len(cell) for cell in header]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, the header {len(header)}")
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    numeric = [bool(rows) and all(_numeric(row[i]) for row in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (width - 1) + ":") if right else "-" * width
        for width, right in zip(widths, numeric, strict=True)
    ]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *map(line, rows)])


def _numeric(cell: str) -> bool:
    stripped = cell.replace(",", "").replace("×", "").replace("+", "").replace("-", "")
    return cell == "—" or stripped.replace(".", "", 1).strip().isdigit()


def _mb(kb: float | None) -> float | None:
    return None if kb is None else kb / _MB


def _load_table(aggs: dict[tuple[str, str], Aggregate]) -> str:
    header = [
        "row",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/req",
        "× floor",
        "req/s × floor",
        "peak RSS MB",
        "errors",
        "mock ms/req",
        "CPU0 other %",
    ]
    rows = []
    for spec in ROWS:
        for target in TARGETS:
            agg = aggs.get((spec.name, target))
            if agg is None:
                continue
            rows.append(
                [
                    spec.name,
                    target,
                    fmt(agg.get("rps"), 0),
                    fmt(agg.get("p50_ms")),
                    fmt(agg.get("p99_ms")),
                    fmt(agg.get("cpu_ms"), 3),
                    fmt(agg.cpu_ratio, 2, "×"),
                    fmt(agg.rps_ratio, 2, "×"),
                    fmt(_mb(agg.get("peak_rss_kb")), 1),
                    str(agg.errors),
                    fmt(agg.get("upstream_cpu_ms"), 3),
                    fmt(agg.get("other_cpu_pct"), 1),
                ]
            )
    return render_table(header, rows)


def _ttfb_table(aggs: dict[tuple[str, str], Aggregate]) -> str:
    header = ["row", "target", "TTFB p50 ms", "TTFB p99 ms", "added TTFB p50 ms"]
    rows = []
    for spec in ROWS:
        if not spec.ttfb:
            continue
        for target in TARGETS:
            agg = aggs.get((spec.name, target))
            if agg is None:
                continue
            rows.append(
                [
                    spec.name,
                    target,
                    fmt(agg.get("ttfb_p50_ms"), 3),
                    fmt(agg.get("ttfb_p99_ms"), 3),
                    fmt(agg.ttfb_added_ms, 3) if target != FLOOR else "(floor)",
                ]
            )
    return render_table(header, rows)


def _paced_table(paced: dict[str, dict[str, Any]]) -> str:
    header = ["target", "events × pace", "first event ms", "last event ms", "streams?"]
    rows = []
    for target, data in paced.items():
        arrivals = data.get("arrivals_ms") or []
        rows.append(
            [
                target,
                f"{data['events']} × {data['pace_ms']:g} ms",
                fmt(arrivals[0] if arrivals else None, 1),
                fmt(arrivals[-1] if arrivals else None, 1),
                "yes" if data.get("streamed") else "NO (buffered)",
            ]
        )
    return render_table(header, rows)


def _memory_table(results: Results) -> str:
    header = [
        "target",
        "idle RSS MB (fresh, each run)",
        "after load 1",
        "after load 2",
        "peak",
        "after load 2 / idle",
    ]
    rows = []
    memory = results.memory
    for target in TARGETS:
        idle = results.idle_rss_kb.get(target)
        if not idle and target != memory.get("target"):
            continue
        idle_cell = ", ".join(fmt(_mb(kb), 1) for kb in idle) if idle else "—"
        after: list[int | None] = [None, None]
        peak = growth = None
        if memory.get("target") == target:
            after = list(memory.get("after_load_kb") or [None, None])
            peak = memory.get("peak_kb")
            growth = ratio(after[-1], memory.get("idle_kb"))
            idle_cell += f" (memory run: {fmt(_mb(memory.get('idle_kb')), 1)})"
        rows.append(
            [
                target,
                idle_cell,
                fmt(_mb(after[0]), 1),
                fmt(_mb(after[-1]), 1),
                fmt(_mb(peak), 1),
                fmt(growth, 2, "×"),
            ]
        )
    return render_table(header, rows)


def _workers_table(results: Results) -> str:
    aggs = aggregate(results.workers)
    header = [
        "target, chat c=64",
        "workers",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/req (all)",
        "× 1 worker",
    ]
    rows = []
    for target in TARGETS:
        for count in (1, 2):
            agg = aggs.get((f"workers-{count}", target))
            if agg is None:
                continue
            scale = _workers_scale(results, target) if count == 2 else 1.0
            rows.append(
                [
                    target,
                    str(count),
                    fmt(agg.get("rps"), 0),
                    fmt(agg.get("p50_ms")),
                    fmt(agg.get("p99_ms")),
                    fmt(agg.get("cpu_ms"), 3),
                    fmt(scale, 2, "×"),
                ]
            )
    return render_table(header, rows)


def _workers_scale(results: Results, target: str) -> float | None:
    """Median over runs of (req/s with 2 workers) / (req/s with 1), within each run."""
    return median(workers_scales(results.workers, target))


def verdicts(results: Results) -> list[list[str]]:
    """Each target of the issue: the figure measured, the goal, met or not."""
    aggs = aggregate(results.measurements)
    out: list[list[str]] = []

    def add(name: str, value: float | None, goal: float, unit: str, at_most: bool = True) -> None:
        if value is None:  # not selected (--only), or the row failed: see the notes
            return
        out.append(
            [
                name,
                f"{value:,.4g}{unit}",  # 4 digits: 1.595 is not 1.6
                f"{'≤' if at_most else '≥'} {goal:g}{unit}",
                "met" if meets(value, goal, at_most) else "MISSED",
            ]
        )

    for target, line in CPU_GOALS.items():
        name = target.removeprefix("sidegate-")
        for row in _CPU_VERDICT_ROWS:
            agg = aggs.get((row, target))
            add(f"{name} CPU/req vs floor, {row}", agg.cpu_ratio if agg else None, line, "×")
    for target in _SIDEGATE:
        agg = aggs.get(("sse-c1", target))
        add(f"{target}: added TTFB p50 at c=1", agg.ttfb_added_ms if agg else None, 0.5, " ms")
    for target in _SIDEGATE:
        idle = results.idle_rss_kb.get(target)
        add(f"{target} idle RSS", _mb(median(idle or [])), 60, " MB")
    memory = results.memory
    growth = ratio((memory.get("after_load_kb") or [None])[-1], memory.get("idle_kb"))
    add(
        f"sidegate-full RSS after 2 × {memory.get('sustain_s', 0):g} s load / idle",
        growth,
        1.5,
        "×",
    )
    for target in _SIDEGATE:
        scale = _workers_scale(results, target)
        add(f"{target} --workers 2 req/s vs 1", scale, WORKERS_GOAL, "×", at_most=False)
    floor = _workers_scale(results, "passthrough")
    if floor is not None:  # no goal: what two processes can do on this machine beside the load
        out.append(["the floor, 2 copies req/s vs 1 (reference)", f"{floor:,.4g}×", "—", "—"])
    out.append(
        [
            "cached 16×1536 embeddings CPU < forwarded",
            "—",
            "< forwarding",
            "measured apart: python -m bench.embeddings_cache",
        ]
    )
    return out


def _cpu(machine: dict[str, Any]) -> str:
    family, number = machine.get("cpu_family"), machine.get("cpu_model_number")
    if family is None or number is None:
        return str(machine["cpu_model"])
    return f"{machine['cpu_model']}, family {family} model {number}"


def steal_shares(steal: dict[str, float]) -> str:
    """``cpu0 2.19%, cpu1 5.28%``: each CPU's share the hypervisor took ("?": none recorded)."""
    return ", ".join(f"{cpu} {share:.2%}" for cpu, share in steal.items()) or "?"


def _idle(machine: dict[str, Any], during: dict[str, float] | None) -> str:
    """How an idle CPU waits, and the time the hypervisor took since boot and, when it was
    recorded, during the invocation: what weighs on a VM's c=1 rows."""
    idle = machine.get("idle") or {}
    driver, poll = idle.get("driver"), idle.get("guest_halt_poll_ns")
    waits = f"cpuidle driver {driver}" if driver is not None else "no cpuidle driver"
    if poll is not None:
        waits += f", guest_halt_poll_ns {poll}"
    if idle.get("halts"):
        waits += " (an idle CPU halts at once)"
    stolen = f"since boot: {steal_shares(machine.get('steal_since_boot') or {})}"
    if during is not None:
        stolen += f"; during this invocation: {steal_shares(during)}"
    return f"Idle CPUs: {waits}. Stolen by the hypervisor {stolen}."


def _speed(results: Results) -> tuple[str | None, str | None]:
    """The header's line on how fast the proxies' CPU ran Python before each row, and a note
    when that changed by :data:`SPEED_SPREAD` or more within the invocation (None, None: not
    measured)."""
    taken = [(one["ms"], one["run"], one["row"]) for one in results.speed if one["ms"]]
    if not taken:
        return None, None
    fastest, slowest = min(taken), max(taken)
    spread = slowest[0] / fastest[0] - 1.0
    line = (
        "Python on the proxies' CPU before each row (`python -m bench.calibrate`, ms, best of "
        f"{CALIBRATION_ROUNDS}): "
        f"{fastest[0]:.1f}–{slowest[0]:.1f}, the slowest {spread:.0%} over the fastest."
    )
    if spread < SPEED_SPREAD:
        return line, None
    note = (
        f"the proxies' CPU ran Python {spread:.0%} slower before run {slowest[1] + 1}'s "
        f"{slowest[2]} than before run {fastest[1] + 1}'s {fastest[2]} (bench.calibrate): the "
        "machine's speed changed during the invocation, for how long one reading a row cannot "
        "say; set CPU ms/req of different rows and runs side by side with care (the ratios, "
        "taken within a run from interleaved slices, are what such a change leaves alone)"
    )
    return line, note


def render(results: Results, meta: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    aggs = aggregate(results.measurements)
    machine = meta["machine"]
    speed_line, speed_note = _speed(results)
    parts = [
        f"## sidegate benchmark — {meta['date']}",
        "",
        f"Machine: {machine['cpus']} CPUs ({_cpu(machine)}), {machine['kernel']}, "
        f"Python {meta['python']}, aiohttp {meta['aiohttp']}; sidegate {meta['commit']}.",
        _idle(machine, meta.get("steal_during")),
        *([speed_line] if speed_line else []),
        f"Command: `{meta['command']}`. {meta['runs']} run(s) × {meta['duration_s']:g} s per row "
        f"(after {meta['warmup_s']:g} s warm-up), cut into {meta.get('slices', 1)} slices the "
        "targets take in turn; figures are medians over runs, ratios are taken within a run "
        "then the median reported.",
        f"Pinning: {meta['pinning']}. Load average before / after: {meta['load_before']} / "
        f"{meta.get('load_after', '?')}. Event loops: {meta.get('loops', '?')}.",
        "",
        "### Load (wrk; sse-c1 by the aiohttp SSE client)",
        "",
        "CPU ms/req is the process under test's utime+stime over the requests it completed; "
        "× floor is that over the passthrough's, same run. mock ms/req: the upstream mock's own "
        "CPU per request (it must stay far below the proxies'). CPU0 other %: how much of the "
        "proxy's CPU went to anything else during the row (other processes, interrupts, "
        "hypervisor steal): the row's noise.",
        "",
        _load_table(aggs),
    ]
    if any((spec.name, target) in aggs for spec in ROWS if spec.ttfb for target in TARGETS):
        parts += ["", "### Time to first SSE byte (aiohttp client)", "", _ttfb_table(aggs)]
    if results.paced:
        parts += [
            "",
            "### Streaming without buffering (paced upstream)",
            "",
            _paced_table(results.paced),
        ]
    if results.memory or results.idle_rss_kb:
        parts += ["", "### Memory", "", _memory_table(results)]
    if results.workers:
        parts += [
            "",
            "### `sidegate serve --workers` (every process on both CPUs)",
            "",
            _workers_table(results),
        ]
    parts += [
        "",
        "### Against the targets of issue 7",
        "",
        render_table(["target", "measured", "goal", "verdict"], verdicts(results)),
    ]
    notes = [*results.problems, *results.notes]
    noisy = [
        f"{agg.row}/{agg.target} {other:.0f}%"
        for agg in aggs.values()
        if (other := agg.get("other_cpu_pct")) is not None and other >= NOISY_PCT
    ]
    if speed_note:
        notes.append(speed_note)
    if noisy:
        notes.append(
            f"noisy rows (CPU0 other ≥ {NOISY_PCT:g}%: something else ran on the proxy's CPU), "
            f"whose CPU ms/req and ratios are unreliable: {', '.join(noisy)}"
        )
    for target, counts in results.log_counts.items():
        if not counts:
            continue
        found = ", ".join(f"{name}: {count:,}" for name, count in sorted(counts.items()))
        notes.append(f"{target}'s log (all its sessions): {found}")
    if results.store_written is not None:
        notes.append(
            "sidegate-full's sqlite store was written: budgets and limits were enforced"
            if results.store_written
            else "sidegate-full's sqlite store was never written: this sidegate accepts the "
            "limits but does not enforce them yet"
        )
    if notes:
        parts += ["", "### Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(parts)


def summary_json(results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything, for ``bench/results/<stamp>/results.json``."""
    aggs = aggregate(results.measurements)
    return {
        "meta": meta,
        "aggregates": [agg.to_json() for agg in aggs.values()],
        "measurements": [m.to_json() for m in results.measurements],
        "ttfb_paced": results.paced,
        "idle_rss_kb": results.idle_rss_kb,
        "memory": results.memory,
        "workers": [m.to_json() for m in results.workers],
        "workers_scale": {
            target: _workers_scale(results, target) for target in TARGETS if target != "direct"
        },
        "store_written": results.store_written,
        "speed": results.speed,
        "log_counts": results.log_counts,
        "verdicts": verdicts(results),
        "notes": results.notes,
        "problems": results.problems,
    }
