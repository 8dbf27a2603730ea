"""Metrics of the worker's cloud API calls. The provider reports to an `ApiObserver`; a
`CloudMetrics` observer is the Prometheus one, registered in a registry the caller passes in (no global state)."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.core.metrics import WhileExporting, register_process_metrics

_API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiObserver(Protocol):
    """Receives one report per cloud API attempt and per rate-limiter wait."""

    def observe_api_call(self, operation: str, response_code: str, seconds: float) -> None:
        """One API attempt: `response_code` is "OK" or the cloud's error code."""

    def observe_rate_limit_wait(self, operation: str, seconds: float) -> None:
        """Time spent waiting for a rate-limiter token before an attempt."""


class NullObserver:
    """An `ApiObserver` that records nothing."""

    def observe_api_call(self, operation: str, response_code: str, seconds: float) -> None:
        pass

    def observe_rate_limit_wait(self, operation: str, seconds: float) -> None:
        pass


class CloudMetrics:
    """The cloud's call durations, rate-limiter waits, calls by bucket, tokens left and throttled
    answers, each labelled with the provider that made them (`observer` gives one provider's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.api_duration_seconds = Histogram(
            "ipam_worker_cloud_api_duration_seconds",
            "Duration of the cloud's API calls, by provider, operation and response code (OK or the cloud's "
            "error code).",
            ["provider", "operation", "response_code"],
            buckets=_API_BUCKETS,
            registry=registry,
        )
        self.rate_limit_wait_seconds = Histogram(
            "ipam_worker_cloud_rate_limit_wait_seconds",
            "Time a cloud API call waited for a token of the rate limiter, by provider and operation.",
            ["provider", "operation"],
            buckets=_WAIT_BUCKETS,
            registry=registry,
        )
        self.calls = Counter(
            "ipam_worker_cloud_calls_total",
            "Cloud API calls made (each attempt and page), by provider, operation and the token bucket they took from",
            ["provider", "operation", "bucket"],
            registry=registry,
        )
        self.bucket_tokens = Gauge(
            "ipam_worker_cloud_bucket_tokens",
            "Tokens left in a cloud's token bucket (shared by every replica) after this worker's last take",
            ["provider", "bucket"],
            registry=registry,
        )
        self.bucket_rate_factor = Gauge(
            "ipam_worker_cloud_bucket_rate_factor",
            "Share of its rate a cloud's token bucket refills at now: lowered by throttled answers, climbs back",
            ["provider", "bucket"],
            registry=registry,
        )
        self.throttled = Counter(
            "ipam_worker_cloud_throttled_total",
            "Cloud answers that throttled a call (EC2's RequestLimitExceeded and the like), by provider, "
            "operation and bucket",
            ["provider", "operation", "bucket"],
            registry=registry,
        )

    def observer(self, provider: str) -> CloudObserver:
        """What provider `provider` reports to."""
        return CloudObserver(self, provider)


class CloudObserver:
    """`CloudMetrics` of one provider: an `ApiObserver` and a `BudgetObserver`."""

    def __init__(self, metrics: CloudMetrics, provider: str) -> None:
        self.metrics = metrics
        self.provider = provider

    def observe_api_call(self, operation: str, response_code: str, seconds: float) -> None:
        self.metrics.api_duration_seconds.labels(self.provider, operation, response_code).observe(seconds)

    def observe_take(self, operation: str, bucket: str, tokens_left: float, rate_factor: float) -> None:
        self.metrics.calls.labels(self.provider, operation, bucket).inc()
        self.metrics.bucket_tokens.labels(self.provider, bucket).set(tokens_left)
        self.metrics.bucket_rate_factor.labels(self.provider, bucket).set(rate_factor)

    def observe_throttled(self, operation: str, bucket: str, rate_factor: float) -> None:
        self.metrics.throttled.labels(self.provider, operation, bucket).inc()
        self.metrics.bucket_rate_factor.labels(self.provider, bucket).set(rate_factor)

    def observe_rate_limit_wait(self, operation: str, seconds: float) -> None:
        self.metrics.rate_limit_wait_seconds.labels(self.provider, operation).observe(seconds)


class WorkerMetrics:
    """Prometheus metrics of the worker's pool maintenance (Cilium's operator metrics as the model).

    Per-process figures go to `registry`; the cluster-wide gauges (nodes, subnets, interfaces) to
    `cluster`, which a scrape sees only from the worker holding the exporter lease."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.cluster = CollectorRegistry(auto_describe=True)
        self.cluster_view = WhileExporting(self.cluster)
        registry.register(self.cluster_view)
        self.exporter = register_process_metrics(registry, "worker")
        self.cloud = CloudMetrics(registry)
        self.allocation_ops = Counter(
            "ipam_worker_ip_allocation_ops_total",
            "Addresses assigned, by subnet and status",
            ["subnet_id", "status"],
            registry=registry,
        )
        self.release_ops = Counter(
            "ipam_worker_ip_release_ops_total",
            "Addresses unassigned, by subnet and status",
            ["subnet_id", "status"],
            registry=registry,
        )
        self.interface_creation_ops = Counter(
            "ipam_worker_interface_creation_ops_total",
            "Interfaces created, by subnet and status",
            ["subnet_id", "status"],
            registry=registry,
        )
        self.action_duration = Histogram(
            "ipam_worker_action_duration_seconds",
            "Duration of one allocation, creation or release",
            ["type", "status", "subnet_id"],
            buckets=_API_BUCKETS,
            registry=registry,
        )
        self.own_overhead = Histogram(
            "ipam_worker_maintenance_overhead_seconds",
            "Time from taking an event to the refilled pool, minus time spent in cloud calls",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.maintenance_seconds = Histogram(
            "ipam_worker_maintenance_seconds",
            "Duration of a maintenance that acted on the cloud",
            buckets=_API_BUCKETS,
            registry=registry,
        )
        self.maintenance_cloud_seconds = Histogram(
            "ipam_worker_maintenance_cloud_seconds",
            "Time a maintenance that acted on the cloud spent in cloud calls",
            buckets=_API_BUCKETS,
            registry=registry,
        )
        self.prefix_fallbacks = Counter(
            "ipam_worker_prefix_fallbacks_total",
            "Prefix requests a subnet had no free /28 for (prefixes backed off there for a while)",
            ["subnet_id"],
            registry=registry,
        )
        self.conflict_give_backs = Counter(
            "ipam_worker_conflict_give_backs_total",
            "Unassign calls giving back addresses the cloud handed out twice or reserved",
            registry=registry,
        )
        self.conflicting_addresses = Counter(
            "ipam_worker_conflicting_addresses_total",
            "Addresses the cloud handed out twice or reserved, given back",
            registry=registry,
        )
        self.nodes = Gauge(
            "ipam_worker_nodes",
            "Nodes by category (total, in-deficit, at-capacity); lease holder only",
            ["category"],
            registry=self.cluster,
        )
        for category in ("total", "in-deficit", "at-capacity"):
            self.nodes.labels(category).set(0)
        self.available_ips_per_subnet = Gauge(
            "ipam_worker_available_ips_per_subnet",
            "Free addresses of each subnet; lease holder only",
            ["subnet_id", "availability_zone"],
            registry=self.cluster,
        )
        self.interfaces = Gauge(
            "ipam_worker_interfaces",
            "Interfaces per node (Cilium's): attached, available (attached with free address slots), "
            "remaining (that may still be attached), empty-slots (addresses they may still take); lease holder only",
            ["node", "state"],
            registry=self.cluster,
        )
        self.resync_total = Counter("ipam_worker_resync_total", "Full resyncs run", registry=registry)
        self.resync_duration = Gauge(
            "ipam_worker_resync_duration_seconds", "How long the last full resync took", registry=registry
        )
        self.cloud_view_age = Gauge(
            "ipam_worker_cloud_view_age_seconds",
            "Seconds since the cloud view was last read in full (1e9 before the first read)",
            registry=registry,
        )
        self.resync_interval = Gauge(
            "ipam_worker_resync_interval_seconds", "The resync interval this worker runs at", registry=registry
        )
        self.events_dead_lettered = Counter(
            "ipam_worker_events_dead_lettered_total",
            "Events moved to the dead letters after their maximum deliveries",
            registry=registry,
        )
        self.queue_lag = Histogram(
            "ipam_worker_queue_lag_seconds",
            "From an event's publication to the worker taking it",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=registry,
        )
        self.events = Counter("ipam_worker_events_total", "Events handled, by outcome", ["outcome"], registry=registry)
        self.addresses_lost = Counter(
            "ipam_worker_addresses_lost_total",
            "Allocated addresses found gone from the cloud (kept by their owners, never handed out again)",
            registry=registry,
        )
        self.leaked_interfaces_deleted = Counter(
            "ipam_worker_leaked_interfaces_deleted_total", "Leaked interfaces deleted", registry=registry
        )

    def exporting(self, holding: bool) -> None:
        """Whether this worker exports the cluster-wide gauges from now on."""
        self.cluster_view.exporting = holding
        self.exporter.set(1 if holding else 0)
