"""Metrics (Prometheus, one registry per app) and the health endpoints' bodies."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from sidegate.middlewares.keys import KeyPools

__all__ = ["LATENCY_BUCKETS", "Metrics"]

_Recorder = tuple[Callable[[], None], Callable[[float], None]]  # count a request, observe latency

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """sidegate's metrics, in a registry of their own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "sidegate_requests",
            "Requests answered by sidegate, by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "sidegate_request_duration_seconds",
            "Time from request to the end of the response, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._upstream = Counter(
            "sidegate_upstream_responses",
            "Responses received from upstreams, by upstream and status.",
            ["upstream", "status"],
            registry=self.registry,
        )
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
        # The per-request updates, bound once per label pair (the hot path is two dict lookups).
        self._recorders: dict[tuple[str, int], _Recorder] = {}
        self._upstream_counters: dict[tuple[str, int], Callable[[], None]] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, endpoint: str, status: int, latency_s: float) -> None:
        """One answered request (called by the access log middleware)."""
        recorder = self._recorders.get((endpoint, status))
        if recorder is None:
            recorder = self._recorders[(endpoint, status)] = (
                self._child(self._requests, endpoint, str(status)).inc,  # type: ignore[attr-defined]
                self._child(self._latency, endpoint).observe,  # type: ignore[attr-defined]
            )
        count, observe = recorder
        count()
        observe(latency_s)

    def upstream_response(self, upstream: str, status: int) -> None:
        count = self._upstream_counters.get((upstream, status))
        if count is None:
            count = self._upstream_counters[(upstream, status)] = self._child(
                self._upstream, upstream, str(status)
            ).inc  # type: ignore[attr-defined]
        count()

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
