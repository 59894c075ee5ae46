"""``@value_type`` classes behave as the frozen dataclasses they replaced, less the guard."""

from __future__ import annotations

import dataclasses

import pytest

from sidegate.middlewares.store import Scope, Settlement, WindowHit
from sidegate.middlewares.values import value_type


@value_type
class Point:
    x: int
    y: int = 0


@value_type(kw_only=True)
class Named:
    name: str


def test_equal_and_hashed_by_fields() -> None:
    assert Point(1, 2) == Point(1, 2) != Point(2, 1)
    assert len({Point(1, 2), Point(1, 2), Point(1)}) == 2
    assert not hasattr(Point(1), "__dict__")  # slotted
    assert dataclasses.replace(Point(1, 2), y=3) == Point(1, 3)


def test_keyword_only_when_asked() -> None:
    assert Named(name="a").name == "a"
    with pytest.raises(TypeError):
        Named("a")  # type: ignore[misc]


def test_store_values_keep_their_checks() -> None:
    hit = WindowHit(Scope("search"), "requests", 10, 1)
    assert hit == WindowHit(Scope("search"), "requests", 10, 1)
    assert hash(hit) == hash(WindowHit(Scope("search"), "requests", 10, 1))
    with pytest.raises(ValueError, match="amount"):
        WindowHit(Scope("search"), "requests", 10, -1)
    with pytest.raises(ValueError, match="no ledger entry"):
        Settlement(reservation_id="r", entries=(object(),))  # type: ignore[arg-type]
