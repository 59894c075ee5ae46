"""Budget period keys in UTC calendar terms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from sidegate.middlewares.store import period_key


@pytest.mark.parametrize(
    ("period", "now", "key", "resets"),
    [
        ("daily", datetime(2025, 1, 31, 23, 59, 59), "d2025-01-31", datetime(2025, 2, 1)),
        ("daily", datetime(2024, 2, 28, 12), "d2024-02-28", datetime(2024, 2, 29)),
        ("weekly", datetime(2025, 6, 15, 15), "w2025-W24", datetime(2025, 6, 16)),
        ("weekly", datetime(2025, 6, 16), "w2025-W25", datetime(2025, 6, 23)),
        ("weekly", datetime(2024, 12, 30, 1), "w2025-W01", datetime(2025, 1, 6)),
        ("weekly", datetime(2027, 1, 1), "w2026-W53", datetime(2027, 1, 4)),
        ("monthly", datetime(2025, 1, 31, 23), "m2025-01", datetime(2025, 2, 1)),
        ("monthly", datetime(2025, 12, 1), "m2025-12", datetime(2026, 1, 1)),
        ("total", datetime(2025, 12, 1), "total", None),
    ],
)
def test_keys_and_resets(period: str, now: datetime, key: str, resets: datetime | None) -> None:
    expected = None if resets is None else resets.replace(tzinfo=UTC)

    assert period_key(period, now.replace(tzinfo=UTC)) == (key, expected)  # type: ignore[arg-type]


def test_other_zones_are_taken_in_utc() -> None:
    tokyo = timezone(timedelta(hours=9))

    key, resets = period_key("daily", datetime(2025, 2, 1, 8, 59, tzinfo=tokyo))

    assert key == "d2025-01-31"
    assert resets == datetime(2025, 2, 1, tzinfo=UTC)


def test_naive_times_and_unknown_periods_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        period_key("daily", datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="unknown"):
        period_key("yearly", datetime(2025, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]
