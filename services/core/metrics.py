"""Metrics both services share: process and build-info metrics, and the exporter lease.

Which replica exports the cluster-wide gauges: the one holding a lease in Redis.

Pool, node, interface and subnet gauges describe the cluster, not the process: exported by every
allocator replica and every worker, a plain `sum()` in Prometheus would count each of them N
times. So one replica of each service holds a short lease (a Redis key with its name and a
time-to-live, renewed at every sample) and only it exports them; the others export none. When
the holder dies, its lease expires and another replica takes over within one time-to-live.
Per-process figures (requests, EC2 calls, events handled) are exported by every replica: they
add up.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Info, PlatformCollector, ProcessCollector

# Renew when ours, take when free; 1 when held by the caller afterwards.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

ALLOCATOR_EXPORTER_KEY = "ipam:exporter:allocator"
WORKER_EXPORTER_KEY = "ipam:exporter:worker"


class ExporterLease:
    """`await lease.hold()`: True while this replica is the one exporting."""

    def __init__(self, client: Any, key: str, holder: str, ttl_seconds: float) -> None:
        self.client = client
        self.key = key
        self.holder = holder
        self.ttl_ms = max(int(ttl_seconds * 1000), 1000)

    async def hold(self) -> bool:
        return bool(await self.client.eval(_HOLD, 1, self.key, self.holder, self.ttl_ms))


def version() -> str:
    try:
        return metadata.version("ipam")
    except metadata.PackageNotFoundError:
        return "unknown"


def register_process_metrics(registry: CollectorRegistry, service: str) -> Gauge:
    """process_* (CPU, memory, file descriptors), python_info and ipam_build_info{service,version,python};
    returns the gauge `ipam_cluster_exporter{service}` (1 on the replica exporting the cluster-wide gauges)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("ipam_build", "Version of the running ipam service", registry=registry).info(
        {"service": service, "version": version(), "python": platform.python_version()}
    )
    exporter = Gauge(
        "ipam_cluster_exporter",
        "1 on the replica that exports the cluster-wide gauges (holds the exporter lease), else 0",
        ["service"],
        registry=registry,
    )
    exporter.labels(service).set(0)
    return exporter.labels(service)


class WhileExporting:
    """A collector showing another registry's metrics only while `exporting` is True: the
    cluster-wide gauges live there, set as usual, and reach a scrape only from the lease holder."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner
        self.exporting = False

    def collect(self) -> Any:
        return self.inner.collect() if self.exporting else iter(())

    def describe(self) -> list[Any]:
        return []  # names are checked in the inner registry
