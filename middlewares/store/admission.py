"""Deciding an admission — the rules every backend shares; each backend reads and writes.

:func:`decide` applies :meth:`~.protocols.Meter.admit`'s rules to the state a backend reads
(inside its transaction or script), and says what to write when it admits: the new count of
each window and the holds to reserve. A single ``hit`` or ``reserve`` is an admission of one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .types import Admission, BudgetHold, RateDecision, Reservation, Scope, WindowHit, window_index

__all__ = ["Decided", "WindowKey", "decide"]

WindowKey = tuple[Scope, str, int]
"""(scope, name, window_s): one rate window's counter."""


@dataclass(frozen=True, slots=True)
class Decided:
    """The admission, and — only when it admits — what to write: ``counts`` maps each window to
    (window index, its new count); ``holds`` are the reservations to make (an id already live in
    its budget is not among them)."""

    admission: Admission
    counts: dict[WindowKey, tuple[int, int]]
    holds: tuple[BudgetHold, ...]


def decide(
    hits: tuple[WindowHit, ...],
    holds: tuple[BudgetHold, ...],
    now: float,
    count_of: Callable[[WindowHit, int], int],
    budget_of: Callable[[BudgetHold], tuple[int, int, bool]],
) -> Decided:
    """Decide the hits in order, then the holds; stop at the first refusal.

    ``count_of(hit, index)`` is the stored count of the hit's window number ``index`` (0 when
    the stored one is another window); ``budget_of(hold)`` is the budget's spend, its live
    reservations and whether the reservation id is one of them. A window or budget named twice
    sees the first.
    """
    counts: dict[WindowKey, tuple[int, int]] = {}
    windows: list[RateDecision] = []
    for hit in hits:
        key, index = (hit.scope, hit.name, hit.window_s), window_index(now, hit.window_s)
        count = counts[key][1] if key in counts else count_of(hit, index)
        allowed = count + hit.amount <= hit.limit
        count += hit.amount if allowed else 0
        start = float(index * hit.window_s)
        windows.append(RateDecision(allowed, count, hit.limit, start, start + hit.window_s))
        if not allowed:
            return Decided(Admission(False, tuple(windows), ()), {}, ())
        counts[key] = (index, count)
    seen: dict[tuple[Scope, str], tuple[int, int]] = {}
    reservations: list[Reservation] = []
    new: list[BudgetHold] = []
    for hold in holds:
        budget = (hold.scope, hold.period)
        if budget in seen:  # the id is live in it by now
            spent, reserved, live = (*seen[budget], True)
        else:
            spent, reserved, live = budget_of(hold)
        amount = max(1, hold.amount_nano)
        if not live and spent + reserved + amount > hold.limit_nano:
            reservations.append(Reservation(False, spent, reserved, hold.limit_nano))
            return Decided(Admission(False, tuple(windows), tuple(reservations)), {}, ())
        if not live:
            reserved += amount
            new.append(hold)
        reservations.append(Reservation(True, spent, reserved, hold.limit_nano))
        seen[budget] = (spent, reserved)
    return Decided(Admission(True, tuple(windows), tuple(reservations)), counts, tuple(new))
