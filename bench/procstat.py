"""CPU time and memory of a process (and its children) from ``/proc``, and how busy a CPU is.

CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (every thread of the process), in clock ticks;
the CPU per request of a row is the difference of two samples over the requests completed between
them. Memory is ``VmRSS`` (now) and ``VmHWM`` (the peak) of ``/proc/<pid>/status``. A CPU's busy
and total ticks come from ``/proc/stat``: what the proxy's CPU spent on anything else during a row
(other processes, interrupts, time stolen by the hypervisor) tells how noisy that row was. The
sockets listening on a TCP port (``/proc/net/tcp`` and ``tcp6``) tell whether every worker
sharing it is up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ESTABLISHED",
    "LISTEN",
    "CpuSample",
    "children",
    "core_ticks",
    "cpu_ms_per_request",
    "listeners",
    "memory_kb",
    "other_share",
    "parse_core_ticks",
    "parse_stat_ticks",
    "parse_status_kb",
    "parse_steal_shares",
    "read_text",
    "sample_cpu",
    "tcp_sockets",
]

_PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU ticks (user + system) summed over some processes, and the tick rate."""

    ticks: int
    ticks_per_s: int = TICKS_PER_S


def parse_stat_ticks(stat: str) -> int:
    """``utime + stime`` from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or parentheses itself, so
    the fields are counted from the last ``)``: utime and stime are fields 14 and 15.
    """
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so field n is fields[n - 3].
    return int(fields[11]) + int(fields[12])


def parse_status_kb(status: str, name: str) -> int | None:
    """The value in kB of the line ``name:`` of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``)."""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    return None


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from every thread's ``children`` file)."""
    found: list[int] = []
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return found


def _family(pid: int, with_children: bool) -> list[int]:
    return [pid, *children(pid)] if with_children else [pid]


def sample_cpu(pid: int, *, with_children: bool = False) -> CpuSample:
    """The CPU ticks used so far by ``pid`` (and its live direct children)."""
    total = 0
    for member in _family(pid, with_children):
        try:
            total += parse_stat_ticks((_PROC / str(member) / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return CpuSample(total)


def cpu_ms_per_request(before: CpuSample, after: CpuSample, requests: int) -> float | None:
    """Milliseconds of CPU per request between two samples (None without requests)."""
    if requests <= 0:
        return None
    return (after.ticks - before.ticks) * 1000.0 / after.ticks_per_s / requests


def memory_kb(pid: int, name: str = "VmRSS", *, with_children: bool = False) -> int | None:
    """``VmRSS`` or ``VmHWM`` of ``pid`` in kB (summed with its children's when asked)."""
    total = None
    for member in _family(pid, with_children):
        try:
            value = parse_status_kb((_PROC / str(member) / "status").read_text(), name)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if value is not None:
            total = (total or 0) + value
    return total


def parse_core_ticks(stat: str, cpu: int) -> tuple[int, int]:
    """``(busy, total)`` ticks of CPU ``cpu`` from the text of ``/proc/stat``.

    The fields are user, nice, system, idle, iowait, irq, softirq, steal (guest time is already
    counted in user); busy is all but idle and iowait, so stolen time counts as busy.
    """
    values = _per_cpu(stat).get(f"cpu{cpu}")
    if values is None:
        raise ValueError(f"no cpu{cpu} line in /proc/stat")
    total = sum(values)
    return total - values[3] - values[4], total


def parse_steal_shares(stat: str, since: str = "") -> dict[str, float]:
    """``{"cpu0": share, ...}`` from the text of ``/proc/stat``: the share (0–1) of each CPU's
    ticks that the hypervisor took (steal), since boot or, given an earlier text of the file as
    ``since``, between the two. Since boot is what a machine has been through; between two
    samples is what weighed on what ran between them (VM AL's first invocation began at 1.1% of
    CPU 0 and 1.3% of CPU 1 since boot; the hypervisor took 2.8% and 7.4% during it). A CPU whose
    line has no steal field (the eighth; kernels before 2.6.11) is left out rather than stopping
    the harness."""
    before = _per_cpu(since)
    out = {}
    for name, values in _per_cpu(stat).items():
        earlier = before.get(name, [0] * len(values))
        # _per_cpu keeps at most eight counts a line; a CPU missing from `since` counts from zero
        ticks = [now - then for now, then in zip(values, earlier, strict=False)]
        if len(ticks) > 7:
            out[name] = ticks[7] / total if (total := sum(ticks)) > 0 else 0.0
    return out


def read_text(path: Path) -> str | None:
    """The file's text, stripped; None when it is missing, unreadable or empty (a machine without
    ``/proc`` or ``/sys`` is described with what is known rather than stopping the harness)."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _per_cpu(stat: str) -> dict[str, list[int]]:
    """Each CPU's first eight tick counts (``cpu0`` ...; not the ``cpu`` line that sums them)."""
    out = {}
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name != "cpu":
            out[name] = [int(value) for value in rest.split()[:8]]
    return out


def core_ticks(cpu: int) -> tuple[int, int]:
    """``(busy, total)`` ticks of CPU ``cpu`` so far."""
    return parse_core_ticks((_PROC / "stat").read_text(), cpu)


def other_share(before: tuple[int, int], after: tuple[int, int], own_ticks: int) -> float | None:
    """The share (0–1) of a CPU's time between two samples not spent on ``own_ticks``."""
    elapsed = after[1] - before[1]
    if elapsed <= 0:
        return None
    return max(0.0, (after[0] - before[0] - own_ticks) / elapsed)


ESTABLISHED = "01"
LISTEN = "0A"
"""TCP states as ``/proc/net/tcp`` writes them."""


def tcp_sockets(port: int, state: str) -> set[int]:
    """The inodes of the TCP sockets in ``state`` whose local port is ``port`` (any address, IPv4
    and IPv6) in this network namespace: with :data:`ESTABLISHED`, the server side of the
    connections a port accepted; with :data:`LISTEN`, its listening sockets."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def listeners(port: int) -> int:
    """Sockets listening on TCP ``port``: one per worker when workers share the port through
    ``SO_REUSEPORT``."""
    return len(tcp_sockets(port, LISTEN))
