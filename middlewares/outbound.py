"""What the upstream client middlewares tell their caller about one outbound request.

The caller (sidegate's forward handler, or any app) puts a fresh :class:`Outbound` in
:data:`OUTBOUND` around ``session.request()`` — most simply with :func:`outbound_scope` — and
reads it afterwards: attempts made, the key of the final attempt, whether sidegate retried and
gave up. The retry and key-rotation middlewares run in the caller's task, so they see the same
object. When none is set, each middleware makes its own for the duration of the request.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .keypool import PoolKey

__all__ = ["OUTBOUND", "Outbound", "current_outbound", "joined_outbound", "outbound_scope"]


@dataclass(eq=False, slots=True)
class Outbound:
    """One outbound request across its attempts.

    Set by the caller, before the request (all optional):

    * ``upstream`` — the name of the upstream, for :meth:`KeyPools.resolve
      <sidegate.middlewares.keys.KeyPools.resolve>`;
    * ``generate_idempotency_key`` — True/False overrides the retry middleware's predicate;
    * ``deadline`` — absolute, on the retry middleware's clock; else ``deadline_s`` from start.

    Filled by the middlewares: ``attempts`` (requests that went upstream), ``key_id`` (the key of
    the final attempt) and ``key_ids`` (one per attempt), ``idempotency_key`` (sent on every
    attempt) and ``idempotency_key_generated``, ``waits`` (seconds slept before each retry),
    ``last_failure`` (``"503"``, ``"connect_error"``, …), ``gave_up`` with ``stop_reason``
    (``"max_attempts"``, ``"deadline"`` or ``"budget"``) and ``over_budget``.
    ``other_key_ready`` and ``pinned_key`` are the middlewares' working state: whether key
    rotation has another key ready after a 429, and the key every attempt of a request carrying an
    ``Idempotency-Key`` is sent with. aiohttp's own one-off resend on a dropped keep-alive
    connection re-runs the middlewares with the same object, so it keeps both the generated
    ``Idempotency-Key`` and the pinned key.
    """

    upstream: str | None = None
    generate_idempotency_key: bool | None = None
    deadline: float | None = None
    attempts: int = 0
    key_id: str | None = None
    key_ids: list[str] = field(default_factory=list)
    idempotency_key: str | None = None
    idempotency_key_generated: bool = False
    waits: list[float] = field(default_factory=list)
    last_failure: str | None = None
    gave_up: bool = False
    stop_reason: str | None = None
    over_budget: bool = False
    other_key_ready: bool = False
    pinned_key: PoolKey | None = field(default=None, repr=False)

    @property
    def retried(self) -> bool:
        """Whether more than one attempt went upstream."""
        return self.attempts > 1

    def response_headers(self) -> dict[str, str]:
        """Headers for the client: ``x-sidegate-attempts``, and ``x-should-retry: false`` when
        sidegate retried and gave up, or refused to retry because of the retry budget.

        A request answered after one attempt with a retryable failure that sidegate did not retry
        because of the deadline gets no ``x-should-retry``: its ``Retry-After`` says when to come
        back.
        """
        headers = {"x-sidegate-attempts": str(self.attempts)}
        if self.gave_up:
            headers["x-should-retry"] = "false"
        return headers


OUTBOUND: contextvars.ContextVar[Outbound | None] = contextvars.ContextVar(
    "sidegate_outbound", default=None
)


def current_outbound() -> Outbound | None:
    """The :class:`Outbound` of the request being sent in this task, if a caller set one."""
    return OUTBOUND.get()


@contextmanager
def outbound_scope(outbound: Outbound | None = None) -> Iterator[Outbound]:
    """Make ``outbound`` (a fresh one when None) current for the block, then restore the previous.

    Wrap ``session.request()`` in it; scopes nest.
    """
    current = Outbound() if outbound is None else outbound
    token = OUTBOUND.set(current)
    try:
        yield current
    finally:
        OUTBOUND.reset(token)


@contextmanager
def joined_outbound() -> Iterator[Outbound]:
    """The caller's :class:`Outbound`, or a fresh one made current for the block."""
    current = OUTBOUND.get()
    if current is not None:
        yield current
        return
    with outbound_scope() as fresh:
        yield fresh
