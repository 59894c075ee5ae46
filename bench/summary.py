"""What a row measured, and the medians over runs with each sidegate row against the floor.

Ratios are taken within a run (a sidegate row over the passthrough row of the same run), then the
median of those ratios over the runs is reported: the machine is noisy, so two figures are only
compared when they were measured minutes apart, not runs apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .stats import median, ratio

__all__ = ["FLOOR", "Aggregate", "Measurement", "aggregate", "workers_scales"]

FLOOR = "passthrough"


@dataclass
class Measurement:
    """One row of one run: a workload at a concurrency, against one target."""

    row: str
    target: str
    run: int
    requests: int = 0
    errors: int = 0
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms: float | None = None
    """CPU milliseconds per completed request of the process under test (all its threads)."""
    upstream_cpu_ms: float | None = None
    """The same for the mock upstream: it must stay far below the proxy's."""
    other_cpu_pct: float | None = None
    """How much of the proxy's CPU went to anything else during the row (noise), in percent."""
    rss_kb: int | None = None
    peak_rss_kb: int | None = None
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_MEDIAN_FIELDS = tuple(
    f.name
    for f in fields(Measurement)
    if f.name not in {"row", "target", "run", "detail", "requests", "errors"}
)


@dataclass
class Aggregate:
    """The medians of one (row, target) over the runs, and its ratios to the floor."""

    row: str
    target: str
    runs: int
    requests: int
    errors: int
    values: dict[str, float | None] = field(default_factory=dict)
    cpu_ratios: list[float] = field(default_factory=list)
    """Each run's CPU ratio to the floor of the same run, in the order of the runs."""
    rps_ratio: float | None = None
    ttfb_added_ms: float | None = None
    details: list[str] = field(default_factory=list)

    @property
    def cpu_ratio(self) -> float | None:
        """The median of the runs' CPU ratios (None for the floor, or with no run to compare)."""
        return median(self.cpu_ratios)

    def get(self, name: str) -> float | None:
        return self.values.get(name)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_ratio": self.cpu_ratio}


def aggregate(measurements: Iterable[Measurement]) -> dict[tuple[str, str], Aggregate]:
    """Medians per (row, target), with per-run ratios to the floor's row of the same run."""
    by_key: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    floor: dict[tuple[str, int], Measurement] = {}
    for m in measurements:
        by_key[(m.row, m.target)].append(m)
        if m.target == FLOOR:
            floor[(m.row, m.run)] = m
    out: dict[tuple[str, str], Aggregate] = {}
    for (row, target), group in by_key.items():
        agg = Aggregate(
            row=row,
            target=target,
            runs=len(group),
            requests=sum(m.requests for m in group),
            errors=sum(m.errors for m in group),
            values={name: median(getattr(m, name) for m in group) for name in _MEDIAN_FIELDS},
            details=sorted({m.detail for m in group if m.detail}),
        )
        if target.startswith("sidegate"):
            base = [floor.get((m.row, m.run)) for m in group]
            agg.cpu_ratios = [
                r
                for m, b in zip(group, base, strict=True)
                if (r := ratio(m.cpu_ms, b.cpu_ms if b else None)) is not None
            ]
            agg.rps_ratio = median(
                ratio(m.rps, b.rps if b else None) for m, b in zip(group, base, strict=True)
            )
            agg.ttfb_added_ms = median(
                m.ttfb_p50_ms - b.ttfb_p50_ms
                for m, b in zip(group, base, strict=True)
                if b is not None and m.ttfb_p50_ms is not None and b.ttfb_p50_ms is not None
            )
        out[(row, target)] = agg
    return out


def workers_scales(workers: Iterable[Measurement], target: str) -> list[float]:
    """Each run's (req/s with 2 workers) / (req/s with 1) for a target, in the order of the runs."""
    by_run: dict[int, dict[str, float | None]] = {}
    for m in workers:
        if m.target == target:
            by_run.setdefault(m.run, {})[m.row] = m.rps
    return [
        r
        for rows in by_run.values()
        if (r := ratio(rows.get("workers-2"), rows.get("workers-1"))) is not None
    ]
