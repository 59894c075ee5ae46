"""Metrics (Prometheus, one registry per app) and the health endpoints' bodies."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidegate.middlewares.keys import KeyPools

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """sidegate's metrics, in a registry of their own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._traffic = _Traffic()  # requests, their durations, upstream responses
        self.registry.register(self._traffic)
        self.streams_in_flight = Gauge(
            "sidegate_streams_in_flight",
            "Streamed responses being passed through now.",
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "sidegate_config_reloads",
            "Config reloads, by result (applied or rejected).",
            ["result"],
            registry=self.registry,
        )
        self._retries = Counter(
            "sidegate_upstream_retries",
            "Retries sent upstream, by the failure that caused them.",
            ["failure"],
            registry=self.registry,
        )
        self._retry_stops = Counter(
            "sidegate_upstream_retry_stops",
            "Requests sidegate stopped retrying, by failure and reason "
            "(max_attempts, deadline, budget: the retry budget was exhausted).",
            ["failure", "reason"],
            registry=self.registry,
        )
        self._cache_items = Counter(
            "sidegate_embeddings_cache_items",
            "Embedding items looked up in the cache, by result (hit, miss).",
            ["result"],
            registry=self.registry,
        )
        self._cache_saved = Counter(
            "sidegate_embeddings_cache_items_saved",
            "Embedding items answered from the cache instead of the upstream.",
            registry=self.registry,
        )
        self._cache_evictions = Counter(
            "sidegate_embeddings_cache_evictions",
            "Cached vectors evicted to stay within max_bytes.",
            registry=self.registry,
        )
        self._cache_bytes = Gauge(
            "sidegate_embeddings_cache_bytes",
            "Bytes of vectors and keys held by the in-process embeddings cache.",
            registry=self.registry,
        )
        self._children: dict[tuple[str, ...], MetricWrapperBase] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, endpoint: str, status: int, latency_s: float) -> None:
        """One answered request (called by the access log middleware)."""
        self._traffic.record(endpoint, status, latency_s)

    def upstream_response(self, upstream: str, status: int) -> None:
        self._traffic.upstream_response(upstream, status)

    def retried(self, failure: str) -> None:
        """RetryObserver: one retry went upstream."""
        self._child(self._retries, failure).inc()  # type: ignore[attr-defined]

    def stopped(self, failure: str, reason: str) -> None:
        """RetryObserver: a request was not retried further."""
        self._child(self._retry_stops, failure, reason).inc()  # type: ignore[attr-defined]

    def hit(self, items: int) -> None:
        """EmbeddingsCacheObserver: items answered from the cache."""
        self._child(self._cache_items, "hit").inc(items)  # type: ignore[attr-defined]

    def missed(self, items: int) -> None:
        self._child(self._cache_items, "miss").inc(items)  # type: ignore[attr-defined]

    def saved(self, items: int) -> None:
        self._cache_saved.inc(items)

    def evicted(self, entries: int) -> None:
        self._cache_evictions.inc(entries)

    def held(self, bytes_held: int) -> None:
        self._cache_bytes.set(bytes_held)

    def watch_keys(self, pools: KeyPools) -> None:
        """Expose each upstream key's state (1 for its current state) at every scrape."""
        self.registry.register(_KeyStates(pools))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Traffic(Collector):
    """The per-request metrics, kept as plain numbers and turned into metric families (the
    samples prometheus_client's Counter and Histogram would give) only when scraped.

    ``sidegate_requests_total{endpoint,status}``, ``sidegate_request_duration_seconds
    {endpoint}`` and ``sidegate_upstream_responses_total{upstream,status}``, each with its
    ``_created`` samples. sidegate counts from its event loop's thread only.
    """

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], list[float]] = {}  # [count, created]
        self._latency: dict[str, _Histogram] = {}
        self._upstream: dict[tuple[str, int], list[float]] = {}  # [count, created]

    def record(self, endpoint: str, status: int, latency_s: float) -> None:
        counted = self._requests.get((endpoint, status))
        if counted is None:
            counted = self._requests[(endpoint, status)] = [0.0, time.time()]
        counted[0] += 1.0
        latency = self._latency.get(endpoint)
        if latency is None:
            latency = self._latency[endpoint] = _Histogram(time.time())
        latency.observe(latency_s)

    def upstream_response(self, upstream: str, status: int) -> None:
        counted = self._upstream.get((upstream, status))
        if counted is None:
            counted = self._upstream[(upstream, status)] = [0.0, time.time()]
        counted[0] += 1.0

    def collect(self) -> Iterator[Metric]:
        requests = Metric(
            "sidegate_requests", "Requests answered by sidegate, by endpoint and status.", "counter"
        )
        for (endpoint, status), (count, created) in self._requests.items():
            labels = {"endpoint": endpoint, "status": str(status)}
            requests.add_sample("sidegate_requests_total", labels, count)
            requests.add_sample("sidegate_requests_created", labels, created)
        yield requests
        name = "sidegate_request_duration_seconds"
        latency = Metric(
            name, "Time from request to the end of the response, by endpoint.", "histogram"
        )
        for endpoint, histogram in self._latency.items():
            labels = {"endpoint": endpoint}
            cumulative = 0.0
            for bound, count in zip(_LATENCY_LE, histogram.buckets, strict=True):
                cumulative += count
                latency.add_sample(f"{name}_bucket", {**labels, "le": bound}, cumulative)
            latency.add_sample(f"{name}_count", labels, cumulative)
            latency.add_sample(f"{name}_sum", labels, histogram.sum)
            latency.add_sample(f"{name}_created", labels, histogram.created)
        yield latency
        upstream = Metric(
            "sidegate_upstream_responses",
            "Responses received from upstreams, by upstream and status.",
            "counter",
        )
        for (name_, status), (count, created) in self._upstream.items():
            labels = {"upstream": name_, "status": str(status)}
            upstream.add_sample("sidegate_upstream_responses_total", labels, count)
            upstream.add_sample("sidegate_upstream_responses_created", labels, created)
        yield upstream


class _Histogram:
    """One endpoint's latencies: a count per bucket (not cumulative; the last is +Inf), the sum."""

    __slots__ = ("buckets", "created", "sum")

    def __init__(self, created: float) -> None:
        self.buckets = [0.0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.created = created

    def observe(self, value: float) -> None:
        self.sum += value
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1.0


_LATENCY_LE = (
    *(floatToGoString(bound) for bound in LATENCY_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
)


class _KeyStates(Collector):
    def __init__(self, pools: KeyPools) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "sidegate_upstream_key_state",
            "Upstream keys by state (active, cooling, quarantined, expired); never their values.",
            labels=["upstream", "key", "state"],
        )
        for upstream, keys in self._pools.snapshot().items():
            for key in keys:
                family.add_metric([upstream, key.id, key.state], 1.0)
        yield family
