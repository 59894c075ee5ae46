"""Config sections of pricing, budgets and per-team rate limits.

These models are merged into :class:`~sidegate.config.models.SidegateConfig`: ``pricing`` maps a
model (Meridian) or service id (Meivan) to a :class:`Price`; a team is a :class:`TeamLimits` (plus
its ``models``); ``budgets`` is :class:`BudgetSettings`. The middlewares read them through
Protocols of their own (:mod:`sidegate.middlewares.pricing`), so nothing here imports aiohttp.

Money is written in USD as YAML numbers or strings and held as :class:`~decimal.Decimal`, never a
float: ``2.50`` is exactly ``Decimal("2.5")``. An amount has at most nine decimal places, so it is
a whole number of nano-USD, the unit every store and ledger counts in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    model_validator,
)

__all__ = [
    "MAX_BUDGET_USD",
    "Budget",
    "BudgetPeriod",
    "BudgetSettings",
    "KeyLimits",
    "Price",
    "RateLimit",
    "TeamLimits",
    "Usd",
]

BudgetPeriod = Literal["daily", "weekly", "monthly", "total"]

MAX_BUDGET_USD = Decimal(9_000_000)
"""Budgets stay below 2**53 nano-USD, the largest integer Redis's Lua compares exactly."""

_NANO = 10**9


def _to_decimal(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected an amount in USD, not a boolean")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("expected a finite amount")
        return Decimal(repr(value))
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a number") from None
    return value


def _whole_nanos(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError("expected a finite amount")
    if value.adjusted() >= 9:
        raise ValueError("expected an amount below 1,000,000,000 USD")
    numerator, denominator = value.as_integer_ratio()
    if numerator * _NANO % denominator:
        raise ValueError("at most 9 decimal places (a whole number of nano-USD)")
    return value


Usd = Annotated[Decimal, Field(ge=0), BeforeValidator(_to_decimal), AfterValidator(_whole_nanos)]
"""A non-negative USD amount (YAML number or string), exact, with at most 9 decimal places."""

BudgetUsd = Annotated[
    Decimal,
    Field(ge=0, le=MAX_BUDGET_USD),
    BeforeValidator(_to_decimal),
    AfterValidator(_whole_nanos),
]

ImagePrices = Usd | dict[str, Usd | dict[str, Usd]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_table(table: ImagePrices) -> None:
    if isinstance(table, Mapping):
        if not table:
            raise ValueError("per_image needs at least one size")
        for size, entry in table.items():
            if isinstance(entry, Mapping) and not entry:
                raise ValueError(f"per_image[{size!r}] needs at least one quality")


class Price(_Section):
    """``pricing.<model>`` — what one model or Meivan service costs.

    * ``input`` / ``output``: USD per 1M prompt / completion tokens (chat, Meivan complete;
      embeddings use ``input`` only).
    * ``per_image``: one price for every image, or by size, or by size then quality —
      ``{"1024x1024": {standard: 0.04, hd: 0.08}, "1792x1024": 0.08}``. A request's size defaults
      to ``1024x1024`` and its quality to ``standard``; a size or quality the table does not name
      is charged the highest price the table holds for it, never nothing.
    * audio transcription: ``per_request`` (each request) plus ``per_second`` × the ``duration``
      of a ``verbose_json`` answer. A ``json`` or ``text`` answer carries no duration, so it is
      charged ``max_audio_seconds`` — the bound reserved for every audio request.
    * ``max_output_tokens``: the model's maximum output, reserved when a request sets no
      ``max_tokens`` / ``max_completion_tokens``.
    """

    input: Usd | None = Field(default=None, description="USD per 1M input (prompt) tokens.")
    output: Usd | None = Field(default=None, description="USD per 1M output (completion) tokens.")
    per_image: ImagePrices | None = Field(
        default=None, description="USD per image; flat, by size, or by size then quality."
    )
    per_request: Usd | None = Field(default=None, description="USD per request (audio).")
    per_second: Usd | None = Field(
        default=None, description="USD per second of transcribed audio (verbose_json duration)."
    )
    max_output_tokens: PositiveInt | None = Field(
        default=None, description="The model's maximum output, reserved without max_tokens."
    )
    max_audio_seconds: PositiveInt | None = Field(
        default=None, description="Seconds reserved (and charged without a duration) per audio."
    )

    @model_validator(mode="after")
    def _complete(self) -> Price:
        charged = (self.input, self.output, self.per_image, self.per_request, self.per_second)
        if all(value is None for value in charged):
            raise ValueError(
                "a price needs at least one of input, output, per_image, per_request, per_second"
            )
        if self.per_second is not None and self.max_audio_seconds is None:
            raise ValueError("per_second needs max_audio_seconds (the bound reserved per request)")
        if self.per_image is not None:
            _check_table(self.per_image)
        return self


class Budget(_Section):
    """``teams.<t>.budget`` (or ``teams.<t>.keys.<k>.budget``): spend allowed per period.

    Periods are UTC calendar days, ISO weeks (from Monday), calendar months, or ``total`` (never
    resets). Spend exactly at ``usd`` refuses the next request. When the store is unreachable a
    budgeted request is refused (503) unless ``fail_open``.
    """

    usd: BudgetUsd = Field(description="USD allowed per period.")
    period: BudgetPeriod = "monthly"
    fail_open: bool = Field(
        default=False, description="Serve requests unmetered while the store is unreachable."
    )


class RateLimit(_Section):
    """``teams.<t>.rate_limit``: per-minute limits counted in the store, across replicas."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    fail_open: bool = Field(
        default=False, description="Serve requests unlimited while the store is unreachable."
    )


class KeyLimits(_Section):
    """``teams.<t>.keys.<key_id>``: a budget and limits of one API key, within its team's."""

    budget: Budget | None = None
    rate_limit: RateLimit | None = None


class TeamLimits(_Section):
    """What a team is allowed to spend and send; merge as a base of ``Team`` (which adds models).

    A request must fit its team's budget and rate limit and, when set, its key's.
    """

    budget: Budget | None = None
    rate_limit: RateLimit | None = None
    keys: dict[str, KeyLimits] = Field(
        default_factory=dict, description="Per API key (by key id) budgets and rate limits."
    )


class BudgetSettings(_Section):
    """``budgets:`` — settings shared by every team's budget."""

    passthrough_reserve_usd: Usd = Field(
        default=Decimal("1.00"),
        description="Reserved for an /upstreams/... call; it is charged from the usage it returns.",
    )
    default_max_output_tokens: PositiveInt = Field(
        default=4096,
        description="Reserved output of a model without max_output_tokens, without max_tokens.",
    )
    reservation_ttl_s: PositiveInt = Field(
        default=900,
        description="A reservation not committed or released by then (a crashed worker) expires.",
    )
