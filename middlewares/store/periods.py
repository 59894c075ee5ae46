"""Budget periods as store keys: UTC calendar days, ISO weeks, calendar months, or all time.

A reservation remembers the period key it was made in and is committed to that key, so a request
that straddles midnight is charged to the period that admitted it and a rollover loses nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

__all__ = ["Period", "period_key"]

Period = Literal["daily", "weekly", "monthly", "total"]


def period_key(period: Period, now: datetime) -> tuple[str, datetime | None]:
    """The key of the ``period`` containing ``now`` and when it ends (None for ``total``).

    Keys: ``d2025-01-31``, ``w2025-W05`` (ISO year and week, from Monday), ``m2025-01``,
    ``total``. ``now`` must be aware; it is taken in UTC.
    """
    if now.tzinfo is None:
        raise ValueError("period_key needs an aware datetime")
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return f"d{day:%Y-%m-%d}", day + timedelta(days=1)
    if period == "weekly":
        year, week, weekday = day.isocalendar()
        return f"w{year}-W{week:02d}", day + timedelta(days=8 - weekday)
    if period == "monthly":
        first = day.replace(day=1)
        following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
        return f"m{first:%Y-%m}", following
    if period == "total":
        return "total", None
    raise ValueError(f"unknown budget period {period!r}")
