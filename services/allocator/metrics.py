"""Prometheus metrics of the allocator (one registry per process, passed down)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.core.metrics import WhileExporting, register_process_metrics


@dataclass
class MethodMetrics:
    """The metric children of one gRPC method, looked up once (labels() costs on a hot path)."""

    in_flight: Any
    duration: Any
    requests: Counter
    method: str
    _by_code: dict[str, Any] = field(default_factory=dict)

    def done(self, code: str, seconds: float) -> None:
        self.in_flight.dec()
        self.duration.observe(seconds)
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self.requests.labels(method=self.method, code=code)
        counter.inc()


class AllocatorMetrics:
    """Per-process metrics in `registry`; the cluster-wide gauges (pools, events) in `cluster`,
    which a scrape sees only from the replica holding the exporter lease."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.cluster = CollectorRegistry(auto_describe=True)
        self.cluster_view = WhileExporting(self.cluster)
        self.registry.register(self.cluster_view)
        self.exporter = register_process_metrics(self.registry, "allocator")
        self._methods: dict[str, MethodMetrics] = {}
        self.requests = Counter(
            "ipam_allocator_requests_total",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ipam_allocator_request_duration_seconds",
            "gRPC call duration by method",
            ["method"],
            buckets=(
                *(0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075),  # fine where a p99 target lies
                *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ipam_allocator_in_flight",
            "gRPC calls being served, by method",
            ["method"],
            registry=self.registry,
        )
        self.events_published = Counter(
            "ipam_allocator_events_published_total",
            "pool events published by kind",
            ["kind"],
            registry=self.registry,
        )
        self.expired = Counter(
            "ipam_allocator_expired_total",
            "addresses released by an expiration timer",
            registry=self.registry,
        )
        self.pool_ips = Gauge(
            "ipam_allocator_pool_ips",
            "addresses per node, pool, family and state (sampled; exported by the lease holder only)",
            ["node", "pool", "family", "state"],
            registry=self.cluster,
        )
        self.events = Gauge(
            "ipam_allocator_events",
            "events in the stream by state: pending (not yet handled) and dead (dead-lettered); lease holder only",
            ["state"],
            registry=self.cluster,
        )
        for state in ("pending", "dead"):
            self.events.labels(state).set(0)

    def exporting(self, holding: bool) -> None:
        """Whether this replica exports the cluster-wide gauges from now on."""
        self.cluster_view.exporting = holding
        self.exporter.set(1 if holding else 0)

    def method(self, name: str) -> MethodMetrics:
        found = self._methods.get(name)
        if found is None:
            found = self._methods[name] = MethodMetrics(
                self.in_flight.labels(method=name), self.duration.labels(method=name), self.requests, name
            )
        return found
