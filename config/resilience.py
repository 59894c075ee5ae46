"""Config sections of the upstream policies: retry, key rotation, rate-limit headers.

These models are merged into :class:`~sidegate.config.models.SidegateConfig` (``retry``,
``rate_limit_headers``), :class:`~sidegate.config.models.UpstreamKey` (:class:`KeyRotationFields`)
and :class:`~sidegate.config.models.Upstream` (:class:`UpstreamRotationFields`). The middlewares
read them through Protocols of their own, so nothing here imports aiohttp and nothing there
imports the config package.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_RETRY_ON",
    "DEFAULT_RETRY_ON_IDEMPOTENT",
    "KeyRotationFields",
    "KeyStrategy",
    "RateLimitHeadersConfig",
    "RateLimitHeadersMode",
    "RetryCondition",
    "RetryConfig",
    "UpstreamRotationFields",
]

RetryCondition = Literal[
    "connect_error", "read_timeout", "disconnected", "429", "500", "502", "503", "504"
]
KeyStrategy = Literal["round_robin", "weighted", "least_limited"]
RateLimitHeadersMode = Literal["passthrough", "team", "strip"]

DEFAULT_RETRY_ON: tuple[RetryCondition, ...] = ("connect_error", "429", "503")
DEFAULT_RETRY_ON_IDEMPOTENT: tuple[RetryCondition, ...] = (
    "502",
    "504",
    "read_timeout",
    "disconnected",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _conditions(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [str(item) if isinstance(item, int) else item for item in value]
    return value


class RetryConfig(_Section):
    """``retry:`` — how sidegate retries an upstream request, and when it stops.

    ``retry_on`` is retried for every request; ``retry_on_idempotent`` only for requests that
    carry an ``Idempotency-Key`` (the client's or one sidegate generated), because the upstream may
    have run them already. ``connect_error`` means the request never reached the upstream;
    ``disconnected`` means the connection dropped before a response arrived. Other 4xx than 429
    are never retried. ``budget_ratio`` of the requests in flight (at least ``budget_min``) may be
    retrying at once; the rest fail fast.
    """

    max_attempts: PositiveInt = Field(
        default=4, description="Attempts per request, the first one included."
    )
    base_delay_s: NonNegativeFloat = Field(
        default=0.25, description="Retry n (from 0) waits uniform(0, min(max_delay_s, base·2^n))."
    )
    max_delay_s: NonNegativeFloat = 8.0
    deadline_s: PositiveFloat = Field(
        default=60.0,
        description="No retry waits past this many seconds after the request started.",
    )
    retry_on: list[RetryCondition] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    retry_on_idempotent: list[RetryCondition] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON_IDEMPOTENT),
        description="Retried only when the request carries an Idempotency-Key.",
    )
    budget_ratio: float = Field(default=0.2, ge=0.0, le=1.0)
    budget_min: NonNegativeInt = 3
    generate_idempotency_key: bool = Field(
        default=True,
        description="Give a Meivan mutating request without an Idempotency-Key a generated one.",
    )

    _to_str = field_validator("retry_on", "retry_on_idempotent", mode="before")(_conditions)

    @model_validator(mode="after")
    def _delays(self) -> RetryConfig:
        if self.max_delay_s < self.base_delay_s:
            raise ValueError("max_delay_s must not be below base_delay_s")
        return self


class RateLimitHeadersConfig(_Section):
    """``rate_limit_headers:`` — what the client sees of ``x-ratelimit-*``.

    ``passthrough`` normalises the upstream's headers, ``team`` shows the caller's team limits
    (or, without them, the sum over the upstream's healthy keys), ``strip`` removes them.
    """

    mode: RateLimitHeadersMode = "passthrough"


class KeyRotationFields(_Section):
    """Fields an upstream key gains for rotation; merge as a base of ``UpstreamKey``.

    ``not_after`` without a timezone is UTC. An expired key is skipped.
    """

    weight: PositiveFloat = Field(
        default=1.0, description="Share of requests with key_strategy weighted."
    )
    not_after: datetime | None = Field(
        default=None, description="The key is not used from then on."
    )

    @field_validator("not_after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class UpstreamRotationFields(_Section):
    """Fields an upstream gains for key rotation; merge as a base of ``Upstream``."""

    key_strategy: KeyStrategy = "round_robin"
    key_expiry_warning_days: NonNegativeFloat = Field(
        default=7.0, description="Warn (once per key) this many days before a key's not_after."
    )
