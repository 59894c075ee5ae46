"""``@value_type``: the dataclass for the small value objects made on every request.

A ``@dataclass(frozen=True, slots=True)`` sets each field through ``object.__setattr__``, which
made one of these cost 1.0-2.0 µs to build (a Settlement, a LedgerEntry, a RateDecision …), six
to eight times a plain slotted dataclass; the limits policy alone makes about a dozen a request.
``@value_type`` classes are slotted dataclasses, equal and hashed by their fields as the frozen ones
were, and immutable to the type checker (``dataclass_transform(frozen_default=True)``: mypy
refuses an assignment to a field), though not at run time. Treat them as frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, dataclass_transform, overload

__all__ = ["value_type"]

_T = TypeVar("_T")


@overload
def value_type(cls: type[_T], /) -> type[_T]: ...


@overload
def value_type(*, kw_only: bool = False) -> Callable[[type[_T]], type[_T]]: ...


@dataclass_transform(frozen_default=True)
def value_type(
    cls: type[_T] | None = None, /, *, kw_only: bool = False
) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Make ``cls`` a value dataclass (see the module docstring); ``kw_only`` as for dataclass."""

    def wrap(cls: type[_T]) -> type[_T]:
        return dataclass(slots=True, unsafe_hash=True, kw_only=kw_only)(cls)

    return wrap if cls is None else wrap(cls)
