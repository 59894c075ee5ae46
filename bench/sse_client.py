"""An aiohttp client for streams: time to the first SSE byte, and the paced no-buffering check.

``python -m bench.sse_client ttfb --url URL --concurrency 16 --duration 10`` keeps ``concurrency``
streams in flight for ``duration`` seconds and prints one JSON object: the count, errors,
requests/s, and p50/p99 of the time to the first body byte and of the whole stream.

``python -m bench.sse_client paced --url URL --events 10 --pace-ms 50`` asks the upstream (through
the target) to send ``events`` deltas ``pace-ms`` apart and prints when each event arrived: a
target that buffers delivers the first event only after the upstream sent the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp
import orjson

from .stats import percentile
from .workloads import BENCH_KEY, STREAM_BODY

__all__ = ["PacedResult", "TtfbResult", "main", "paced", "ttfb"]

_DONE = b"data: [DONE]"


@dataclass
class TtfbResult:
    """Streams completed in the window, and their timings (milliseconds)."""

    requests: int = 0
    errors: int = 0
    duration_s: float = 0.0
    ttfb_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    first_error: str | None = None

    def summary(self) -> dict[str, object]:
        """The JSON the client prints (percentiles instead of every sample)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "duration_s": self.duration_s,
            "rps": self.requests / self.duration_s if self.duration_s else None,
            "ttfb_ms": {"p50": percentile(self.ttfb_ms, 50), "p99": percentile(self.ttfb_ms, 99)},
            "latency_ms": {
                "p50": percentile(self.total_ms, 50),
                "p99": percentile(self.total_ms, 99),
            },
        }


@dataclass
class PacedResult:
    """When each event of one paced stream arrived (ms after the request was sent)."""

    events: int
    pace_ms: float
    arrivals_ms: list[float]
    status: int

    @property
    def streamed(self) -> bool:
        """The first event arrived well before the upstream sent its last one."""
        if self.status != 200 or len(self.arrivals_ms) < self.events:
            return False
        upstream_last_ms = (self.events - 1) * self.pace_ms
        return self.arrivals_ms[0] < upstream_last_ms / 2

    def summary(self) -> dict[str, object]:
        out = asdict(self)
        out["streamed"] = self.streamed
        return out


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    headers.update(extra or {})
    return headers


async def _one_stream(session: aiohttp.ClientSession, url: str, result: TtfbResult) -> None:
    started = time.perf_counter()
    async with session.post(url, data=STREAM_BODY, headers=_headers()) as response:
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {(await response.read())[:200]!r}")
        first = await response.content.readany()
        ttfb = time.perf_counter() - started
        tail = first[-64:]
        while chunk := await response.content.readany():
            tail = (tail + chunk)[-64:]
    if _DONE not in tail:
        raise RuntimeError("the stream did not end with data: [DONE]")
    result.ttfb_ms.append(ttfb * 1000.0)
    result.total_ms.append((time.perf_counter() - started) * 1000.0)
    result.requests += 1


async def ttfb(url: str, concurrency: int, duration_s: float) -> TtfbResult:
    """Keep ``concurrency`` streams going to ``url`` for ``duration_s``; time each one."""
    result = TtfbResult()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + duration_s

        async def worker() -> None:
            while loop.time() < deadline:
                try:
                    await _one_stream(session, url, result)
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.duration_s = loop.time() - started
    return result


async def paced(url: str, events: int, pace_ms: float) -> PacedResult:
    """One stream of ``events`` deltas sent ``pace_ms`` apart; when did each one arrive?"""
    headers = _headers({"x-bench-events": str(events), "x-bench-pace-ms": str(pace_ms)})
    arrivals: list[float] = []
    timeout = aiohttp.ClientTimeout(total=30 + events * pace_ms / 1000.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        async with session.post(url, data=STREAM_BODY, headers=headers) as response:
            status = response.status
            buffered = b""
            while chunk := await response.content.readany():
                now = (time.perf_counter() - started) * 1000.0
                buffered += chunk
                while b"\n\n" in buffered:
                    event, buffered = buffered.split(b"\n\n", 1)
                    if event.startswith(b"data: {") and b'"content":" ' in event:
                        arrivals.append(now)
    return PacedResult(events=events, pace_ms=pace_ms, arrivals_ms=arrivals, status=status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_client", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    timed = modes.add_parser("ttfb", help="time to first byte under load")
    timed.add_argument("--url", required=True)
    timed.add_argument("--concurrency", type=int, default=1)
    timed.add_argument("--duration", type=float, default=5.0)
    check = modes.add_parser("paced", help="one paced stream: when did each event arrive")
    check.add_argument("--url", required=True)
    check.add_argument("--events", type=int, default=10)
    check.add_argument("--pace-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    if args.mode == "ttfb":
        summary = asyncio.run(ttfb(args.url, args.concurrency, args.duration)).summary()
    else:
        summary = asyncio.run(paced(args.url, args.events, args.pace_ms)).summary()
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
