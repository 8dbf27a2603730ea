"""The allocator's typed settings: built once at start-up from flags and `IPAM_*` variables."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core import redis_client


class AllocatorSettings(BaseSettings):
    """Every setting of `ipam-allocator` (flag `--redis-url` = variable `IPAM_REDIS_URL`)."""

    model_config = SettingsConfigDict(
        env_prefix="IPAM_", cli_kebab_case=True, cli_prog_name="ipam-allocator", cli_implicit_flags=True, extra="ignore"
    )

    grpc_address: str = Field("127.0.0.1:50051", description="host:port the gRPC server listens on")
    metrics_address: str = Field(
        "127.0.0.1:9100",
        description="host:port of the Prometheus endpoint "
        "(worker process i of --workers listens on port+i); empty disables it",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (a seed node for a cluster)")
    redis_cluster: bool = Field(False, description="talk to a Redis Cluster")
    redis_sentinels: str = Field(
        "",
        description="Sentinels (host:port,...) to ask for the master's address, again after every lost "
        "connection (its host in redis_url is ignored)",
    )
    redis_sentinel_master: str = Field("", description="the master's name at the Sentinels")
    redis_min_replicas: int = Field(
        0,
        ge=0,
        description="a pool change is answered OK only once this many replicas hold it (WAIT); fewer within "
        "redis_replica_wait_seconds answer ABORTED OUTCOME_UNKNOWN (0 = no wait: a lone Redis)",
    )
    redis_replica_wait_seconds: float = Field(
        0.5,
        gt=0,
        description="how long a change waits for redis_min_replicas replicas (below redis_timeout_seconds)",
    )
    redis_timeout_seconds: float = Field(
        1.0, description="bound on every Redis call; past it the call fails with UNAVAILABLE"
    )
    redis_max_connections: int = Field(64, description="connections per process (callers wait for a free one)")
    redis_pipeline_scripts: bool = Field(
        True,
        description="send the pool scripts of one event-loop turn in one write on one shared connection "
        "(less CPU per call; redis:// URLs without cluster only, else each goes through the pool)",
    )
    replica: str = Field(
        "",
        description="this replica's name in its log lines (`make run` sets 1, 2, ...); empty = the hostname "
        "(a container's id under Docker)",
    )
    workers: int = Field(
        1, description="server processes sharing the port (SO_REUSEPORT); one ending on its own stops them all"
    )
    client_tokens: SecretStr = Field(SecretStr(""), description="comma-separated bearer tokens of the client role")
    admin_tokens: SecretStr = Field(
        SecretStr(""),
        description="comma-separated bearer tokens of the admin role "
        "(node management and worker calls; admin may also call the Allocator)",
    )
    tls_cert_file: str = Field("", description="server certificate (PEM); set with tls_key_file to serve TLS")
    tls_key_file: str = Field("", description="server private key (PEM)")
    tls_client_ca_file: str = Field("", description="CA that client certificates must chain to (mutual TLS)")
    ipv4_enabled: bool = Field(True, description="hand out IPv4 addresses")
    ipv6_enabled: bool = Field(True, description="hand out IPv6 addresses")
    reuse_cooldown_seconds: float = Field(
        30.0,
        description="a released address is not handed out again for "
        "this long (conntrack lag); cooling addresses do not count as free "
        "headroom, so the pool refills instead of starving",
    )
    event_coalesce_seconds: int = Field(
        10,
        description="at most one pending event per node and pool; the "
        "marker expires after this long if the worker never took the event",
    )
    timer_sweep_seconds: float = Field(0.5, description="how often expiration timers are checked")
    timer_full_scan_seconds: float = Field(30.0, description="how often every pool's timers are re-indexed")
    pool_metrics_seconds: float = Field(
        5.0, description="how often per-node pool levels are sampled into the metrics (0 = never)"
    )
    max_concurrent_rpcs: int = Field(
        0,
        description="shed calls past this many in flight with RESOURCE_EXHAUSTED SERVER_OVERLOADED; health "
        "checks are never shed (0 = no limit)",
    )
    shutdown_grace_seconds: float = Field(10.0, description="on SIGTERM, in-flight calls get this long to finish")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @model_validator(mode="after")
    def _redis(self) -> AllocatorSettings:
        redis_client.check_sentinel_settings(self.redis_sentinels, self.redis_sentinel_master, self.redis_cluster)
        if self.redis_min_replicas and self.redis_replica_wait_seconds >= self.redis_timeout_seconds:
            raise ValueError("IPAM_REDIS_REPLICA_WAIT_SECONDS must be below IPAM_REDIS_TIMEOUT_SECONDS")
        return self

    @staticmethod
    def _tokens(secret: SecretStr) -> frozenset[str]:
        return frozenset(t.strip() for t in secret.get_secret_value().split(",") if t.strip())

    @property
    def client_token_set(self) -> frozenset[str]:
        return self._tokens(self.client_tokens)

    @property
    def admin_token_set(self) -> frozenset[str]:
        return self._tokens(self.admin_tokens)
