"""Prometheus metrics of the allocator (one registry per process, passed down)."""

from __future__ import annotations

import bisect
import itertools
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from services.core.metrics import WhileExporting, register_process_metrics

_DURATION_BUCKETS = (
    *(0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075),  # fine where a p99 target lies
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    math.inf,
)


class MethodMetrics:
    """The figures of one gRPC method, as plain numbers that a scrape reads (`_CallMetrics`): a
    prometheus_client child takes a lock and checks its labels at every change, which cost more than
    the rest of a call's bookkeeping (a call's three changes: 2.07 µs through prometheus_client's
    Counter, Histogram and Gauge, 0.30 µs here; timeit on the 2-CPU VM of the benchmarks). The
    exposition is the same (a unit test compares the two). Changed on the event loop only."""

    __slots__ = ("method", "in_flight", "buckets", "sum", "by_code", "created")

    def __init__(self, method: str) -> None:
        self.method = method
        self.in_flight = 0
        self.buckets = [0] * len(_DURATION_BUCKETS)  # per bucket, not cumulative
        self.sum = 0.0
        self.by_code: dict[str, tuple[int, float]] = {}  # code -> (calls, when the code was first seen)
        self.created = time.time()

    def start(self) -> None:
        self.in_flight += 1

    def done(self, code: str, seconds: float) -> None:
        self.in_flight -= 1
        self.sum += seconds
        self.buckets[bisect.bisect_left(_DURATION_BUCKETS, seconds)] += 1  # the first bound >= seconds
        counted = self.by_code.get(code)
        self.by_code[code] = (counted[0] + 1, counted[1]) if counted is not None else (1, time.time())


class _CallMetrics:
    """ipam_allocator_requests_total{method,code}, ipam_allocator_request_duration_seconds{method} and
    ipam_allocator_in_flight{method}, read from the methods' `MethodMetrics` at each scrape."""

    def __init__(self, methods: dict[str, MethodMetrics]) -> None:
        self._methods = methods

    def describe(self) -> list[Metric]:
        return self._families([])

    def collect(self) -> list[Metric]:
        return self._families(list(self._methods.values()))

    @staticmethod
    def _families(methods: list[MethodMetrics]) -> list[Metric]:
        requests = CounterMetricFamily(
            "ipam_allocator_requests", "gRPC calls by method and status code", labels=["method", "code"]
        )
        duration = HistogramMetricFamily(
            "ipam_allocator_request_duration_seconds", "gRPC call duration by method", labels=["method"]
        )
        in_flight = GaugeMetricFamily(
            "ipam_allocator_in_flight", "gRPC calls being served, by method", labels=["method"]
        )
        for m in methods:
            for code, (calls, created) in list(m.by_code.items()):
                requests.add_metric([m.method, code], calls, created=created)
            buckets, total = list(m.buckets), m.sum
            cumulative = list(itertools.accumulate(buckets))
            duration.add_metric(
                [m.method],
                [(floatToGoString(bound), count) for bound, count in zip(_DURATION_BUCKETS, cumulative, strict=True)],
                total,
            )
            duration.samples.append(Sample(f"{duration.name}_created", {"method": m.method}, m.created))
            in_flight.add_metric([m.method], m.in_flight)
        return [requests, duration, in_flight]


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
        self.registry.register(_CallMetrics(self._methods))
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
            found = self._methods[name] = MethodMetrics(name)
        return found
