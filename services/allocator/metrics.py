"""Prometheus metrics of the allocator (one registry per process, passed down)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AllocatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
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
            "addresses per node, pool, family and state (sampled)",
            ["node", "pool", "family", "state"],
            registry=self.registry,
        )
