"""Policies that act only before the handler, and the chain that runs them in one frame.

A policy such as auth, routing or the rate-limit headers' mark does its work before the handler
and nothing after it: it is a *step*, a function of the request that returns ``None`` or, when it
has to wait (reading a body, verifying a JWT), an awaitable. :class:`StepMiddleware` is a step as
an ordinary aiohttp middleware, for an app of one's own. :func:`compose` builds sidegate's chain:
consecutive steps run one after the other in their caller's frame (in one coroutine from the
first that has to wait) instead of one coroutine each wrapping the rest of the chain, so a
request's stack is shallower for as long as it waits on the upstream (every resumption passes
through each frame on it) and each step costs a call, not a coroutine. What a request sees is
the same: the steps run in order, an error raised by one stops the chain there.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["Step", "StepMiddleware", "compose"]

Step = Callable[[web.Request], Awaitable[None] | None]


class StepMiddleware:
    """An aiohttp (new-style) middleware that runs ``step`` and then the handler."""

    __middleware_version__ = 1
    __slots__ = ("step",)

    def __init__(self, step: Step) -> None:
        self.step = step

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _start((self.step,), handler, request)


def compose(policies: Sequence[Middleware], handler: Handler) -> Handler:
    """``policies`` (outermost first) around ``handler``; runs of steps share one frame.

    The handler returned is a plain callable returning an awaitable where the chain starts with
    steps: a step's error is raised when it is called, so await it where it is called
    (``await handler(request)``, as middlewares do).
    """
    chain = handler
    steps: list[Step] = []
    for policy in reversed(policies):
        if isinstance(policy, StepMiddleware):
            steps.append(policy.step)
            continue
        chain = functools.partial(policy, handler=_after(steps, chain))
        steps = []
    return _after(steps, chain)


def _after(reversed_steps: list[Step], handler: Handler) -> Handler:
    """``handler`` after the steps (given innermost first).

    While every step finishes at once, nothing waits: the steps run in the caller's frame and
    the handler's own coroutine is what it awaits, so the run adds no frame to the request's
    stack. From the first step that has to wait, the rest runs in one coroutine.
    """
    if not reversed_steps:
        return handler
    steps = tuple(reversed(reversed_steps))
    return functools.partial(_start, steps, handler)


def _start(
    steps: tuple[Step, ...], handler: Handler, request: web.Request
) -> Awaitable[web.StreamResponse]:
    """Run ``steps`` in order, then ``handler``: the handler's own awaitable while every step
    finishes at once, else a coroutine that waits and goes on from there."""
    for index, step in enumerate(steps):
        pending = step(request)
        if pending is not None:
            return _resume(pending, steps[index + 1 :], handler, request)
    return handler(request)


async def _resume(
    pending: Awaitable[None], steps: tuple[Step, ...], handler: Handler, request: web.Request
) -> web.StreamResponse:
    await pending
    return await _start(steps, handler, request)
