"""Pool the runs of several invocations: ``python -m bench.pool bench/results/<stamp> ...``.

One invocation's medians rest on its own runs (three, with ``--runs 3``); a VM's figures in the
README rest on every run of several invocations (two sets of three chat invocations: 18 runs).
Each run's ratio is taken against the floor of the same run of the same invocation, as
``bench.summary`` takes it, and only then pooled. For each row and sidegate target this prints the
median of the pooled ratios, their range, how many are over the issue's line, and each invocation's
own median; then the time a stream's first byte adds at c=1 and the ``--workers 2`` scaling, pooled
the same way, for the invocations that measured them; and the share of each CPU the hypervisor
took during each invocation, where its ``results.json`` recorded it.

``python -m bench.pool --markdown DIR...`` prints instead the rows of a VM's per-set table as the
README writes them (bare, full, each invocation's medians, the floor's CPU ms a request), its
ratios by :func:`figure`, a median on the wrong side of its line in bold.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from .report import CPU_GOALS, WORKERS_GOAL, fmt, meets, render_table, steal_shares
from .stats import median
from .summary import FLOOR, Measurement, aggregate, workers_scales

__all__ = [
    "Invocation",
    "Pooled",
    "figure",
    "load",
    "main",
    "markdown",
    "pool",
    "pool_workers",
    "render",
]


@dataclass
class Invocation:
    """The runs one ``python -m bench`` wrote to its ``results.json``."""

    name: str
    measurements: list[Measurement]
    workers: list[Measurement]
    steal_during: dict[str, float] | None = None
    """The share of each CPU the hypervisor took while it ran (None: not recorded)."""


@dataclass
class Pooled:
    """One (row, target) over every run of the invocations, against the floor of each run."""

    row: str
    target: str
    ratios: list[float]
    by_invocation: list[float | None]
    line: float
    at_most: bool = True
    """The goal is at most the line (CPU); False: at least the line (``--workers 2``)."""
    ttfb_added_ms: float | None = None
    """The median over the pooled runs of the first byte's added time (streamed rows)."""

    @property
    def median(self) -> float | None:
        return median(self.ratios)

    @property
    def over(self) -> int:
        """Runs on the wrong side of the line: over it, or under it for an at-least goal."""
        return sum(not meets(r, self.line, self.at_most) for r in self.ratios)


def load(directory: Path) -> Invocation:
    data = orjson.loads((directory / "results.json").read_bytes())
    return Invocation(
        name=directory.name,
        measurements=[Measurement(**m) for m in data.get("measurements", [])],
        workers=[Measurement(**m) for m in data.get("workers", [])],
        steal_during=data.get("meta", {}).get("steal_during"),
    )


def _renumbered(per_invocation: Iterable[list[Measurement]]) -> list[Measurement]:
    """Every invocation's measurements, with runs numbered apart so no two invocations share one."""
    out: list[Measurement] = []
    offset = 0
    for measurements in per_invocation:
        out += [dataclasses.replace(m, run=m.run + offset) for m in measurements]
        offset += max((m.run for m in measurements), default=-1) + 1
    return out


def pool(invocations: Sequence[Invocation]) -> list[Pooled]:
    """Each sidegate row's CPU ratios over every run of the invocations, in the order of rows."""
    pooled = aggregate(_renumbered(i.measurements for i in invocations))
    each = [aggregate(invocation.measurements) for invocation in invocations]
    out = []
    for (row, target), agg in pooled.items():
        if target not in CPU_GOALS:
            continue
        out.append(
            Pooled(
                row=row,
                target=target,
                ratios=agg.cpu_ratios,
                by_invocation=[a[(row, target)].cpu_ratio for a in each if (row, target) in a],
                line=CPU_GOALS[target],
                ttfb_added_ms=agg.ttfb_added_ms,
            )
        )
    return out


def pool_workers(invocations: Sequence[Invocation]) -> list[Pooled]:
    """Each target's ``--workers 2`` scaling over every run of the invocations that measured it."""
    measured = [invocation for invocation in invocations if invocation.workers]
    workers = _renumbered(i.workers for i in measured)
    out = []
    for target in dict.fromkeys(m.target for m in workers):
        out.append(
            Pooled(
                row="workers",
                target=target,
                ratios=workers_scales(workers, target),
                by_invocation=[median(workers_scales(i.workers, target)) for i in measured],
                line=WORKERS_GOAL,
                at_most=False,
            )
        )
    return out


def _rows(pooled: Sequence[Pooled]) -> list[list[str]]:
    return [
        [
            p.row,
            p.target,
            str(len(p.ratios)),
            fmt(p.median, 3, "×"),
            f"{fmt(min(p.ratios, default=None), 3)}–{fmt(max(p.ratios, default=None), 3)}",
            f"{p.over} {'over' if p.at_most else 'under'} {p.line:g}×",
            ", ".join(fmt(m, 3) for m in p.by_invocation),
        ]
        for p in pooled
    ]


def render(invocations: Sequence[Invocation]) -> str:
    header = ["row", "target", "runs", "median", "range", "against the line", "by invocation"]
    pooled = pool(invocations)
    parts = [
        f"{len(invocations)} invocations: {', '.join(i.name for i in invocations)}",
        "",
        render_table(header, _rows(pooled)),
    ]
    ttfb = [
        [p.target, str(len(p.ratios)), fmt(p.ttfb_added_ms, 3)] for p in pooled if p.row == "sse-c1"
    ]
    if ttfb:
        parts += ["", render_table(["sse-c1", "runs", "added TTFB p50 ms (median)"], ttfb)]
    if workers := pool_workers(invocations):
        parts += ["", render_table(header, _rows(workers))]
    stolen = [
        [i.name, steal_shares(i.steal_during)] for i in invocations if i.steal_during is not None
    ]
    if stolen:
        parts += ["", render_table(["invocation", "stolen by the hypervisor during it"], stolen)]
    return "\n".join(parts)


def figure(value: float, line: float) -> str:
    """A ratio as the README writes it: two decimals, or three where two would round a final 5
    (1.185, 1.955) or read exactly the line, hiding which side of it the figure is on (1.199 and
    1.204 are not 1.20)."""
    three = f"{value:.3f}"
    two = f"{value:.2f}"
    return three if three.endswith("5") or float(two) == line else two


def markdown(invocations: Sequence[Invocation]) -> str:
    """The rows of the README's per-set table for these invocations: for each row, bare's and the
    full chain's median over every run (bold when on the wrong side of its line) with the range,
    each invocation's median, and the range of the floor's CPU ms a request."""
    pooled = {(p.row, p.target): p for p in pool(invocations)}
    floors: dict[str, list[float]] = {}
    for invocation in invocations:
        for m in invocation.measurements:
            if m.target == FLOOR and m.cpu_ms is not None:
                floors.setdefault(m.row, []).append(m.cpu_ms)
    names = [target.removeprefix("sidegate-") for target in CPU_GOALS]
    lines = [
        "| row | "
        + " | ".join([*names, *(f"{name} by invocation" for name in names)])
        + " | floor CPU ms/req |",
        "| --- |" + " ---: |" * len(names) + " --- |" * len(names) + " ---: |",
    ]
    for row in dict.fromkeys(row for row, _ in pooled):
        judged, each_median = [], []  # per target: the median (and range), each invocation's
        for target in CPU_GOALS:
            p = pooled.get((row, target))
            if p is None or p.median is None:
                judged.append("—")
                each_median.append("—")
                continue
            med = f"{figure(p.median, p.line)}×"
            if not meets(p.median, p.line, p.at_most):
                med = f"**{med}**"
            judged.append(
                f"{med} ({figure(min(p.ratios), p.line)}–{figure(max(p.ratios), p.line)})"
            )
            each_median.append(
                ", ".join("—" if m is None else figure(m, p.line) for m in p.by_invocation)
            )
        cells = [row, *judged, *each_median]
        spent = floors.get(row, [])
        cells.append(f"{min(spent):.3f}–{max(spent):.3f}" if spent else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_markdown = args[:1] == ["--markdown"]
    if as_markdown:
        args = args[1:]
    if not args or any(arg.startswith("-") for arg in args):
        print(__doc__, file=sys.stderr)
        return 2
    invocations = [load(Path(arg)) for arg in args]
    print(markdown(invocations) if as_markdown else render(invocations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
