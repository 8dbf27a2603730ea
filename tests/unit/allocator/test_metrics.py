"""The calls' metrics (`MethodMetrics`, kept as plain numbers and read at scrape time) expose what
prometheus_client's own Counter, Histogram and Gauge expose for the same calls."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.allocator import metrics as allocator_metrics
from services.allocator.metrics import AllocatorMetrics

CALLS = [("AllocateNext", "OK", 0.0012), ("AllocateNext", "OK", 0.0002), ("AllocateNext", "UNAVAILABLE", 0.0075)]
CALLS += [("Release", "OK", 0.0031), ("Release", "NOT_FOUND", 12.0), ("AllocateNext", "OK", 0.25)]


def _calls_text(registry: CollectorRegistry) -> str:
    """The exposition of the calls' metrics, creation times left out."""
    text = generate_latest(registry).decode()
    lines = [
        line for line in text.splitlines() if "ipam_allocator_request" in line or "ipam_allocator_in_flight" in line
    ]
    return "\n".join(re.sub(r"(_created\{.*\}) \S+$", r"\1 T", line) for line in lines)


def _reference() -> str:
    registry = CollectorRegistry()
    requests = Counter(
        "ipam_allocator_requests_total", "gRPC calls by method and status code", ["method", "code"], registry=registry
    )
    duration = Histogram(
        "ipam_allocator_request_duration_seconds",
        "gRPC call duration by method",
        ["method"],
        buckets=allocator_metrics._DURATION_BUCKETS,
        registry=registry,
    )
    in_flight = Gauge("ipam_allocator_in_flight", "gRPC calls being served, by method", ["method"], registry=registry)
    for method in ("Dump", "AllocateNext", "Release"):  # in the order the allocator first sees them
        in_flight.labels(method=method)
        duration.labels(method=method)
    for method, code, seconds in CALLS:
        in_flight.labels(method=method).inc()
        duration.labels(method=method).observe(seconds)
        requests.labels(method=method, code=code).inc()
        in_flight.labels(method=method).dec()
    in_flight.labels(method="Release").inc()  # one call still being served
    return _calls_text(registry)


def test_calls_metrics_expose_what_prometheus_clients_metrics_would() -> None:
    metrics = AllocatorMetrics()
    metrics.method("Dump")  # looked up, never called: its gauge and histogram show zeros
    for method, code, seconds in CALLS:
        metrics.method(method).start()
        metrics.method(method).done(code, seconds)
    metrics.method("Release").start()
    assert _calls_text(metrics.registry) == _reference()


def test_a_duration_on_a_bucket_bound_counts_in_that_bucket() -> None:
    metrics = AllocatorMetrics()
    calls = metrics.method("Ping")
    calls.start()
    calls.done("OK", 0.001)
    text = _calls_text(metrics.registry)
    assert 'ipam_allocator_request_duration_seconds_bucket{le="0.0005",method="Ping"} 0.0' in text
    assert 'ipam_allocator_request_duration_seconds_bucket{le="0.001",method="Ping"} 1.0' in text
