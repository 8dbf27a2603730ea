"""The worker's typed settings: built once at start-up from flags and `IPAM_*` variables."""

from __future__ import annotations

import os
import socket

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.cloudworker.providers.registry import CLOUDS, CloudSettings, unknown_cloud
from services.core import contract


class WorkerSettings(CloudSettings, BaseSettings):
    """Every setting of `ipam-cloudworker` (flag `--ec2-qps` = variable `IPAM_EC2_QPS`); each
    cloud's own come from its settings model (`providers/registry.py`'s `CloudSettings`)."""

    model_config = SettingsConfigDict(
        env_prefix="IPAM_",
        cli_kebab_case=True,
        cli_prog_name="ipam-cloudworker",
        cli_implicit_flags=True,
        extra="ignore",
    )

    grpc_address: str = Field("127.0.0.1:50051", description="the allocator (host:port, or several comma-separated)")
    admin_token: SecretStr = Field(SecretStr(""), description="bearer token of the admin role for the allocator")
    tls_ca_file: str = Field("", description="CA of the allocator's certificate: set to talk TLS")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the events stream")
    redis_cluster: bool = Field(False, description="talk to a Redis Cluster")
    redis_sentinels: str = Field(
        "", description="Sentinels (host:port,...) to ask for the master's address (its host in redis_url is ignored)"
    )
    redis_sentinel_master: str = Field("", description="the master's name at the Sentinels")
    metrics_address: str = Field(
        "127.0.0.1:9200", description="host:port of the Prometheus endpoint; empty disables it"
    )
    cloud: str = Field("aws", description="the cloud the addresses come from: aws, or cluster-pool (no cloud)")
    cluster_name: str = Field("ipam", description="tags our interfaces, so leaked ones of this cluster are found")
    consumer_group: str = Field(contract.CONSUMER_GROUP, description="Redis Streams consumer group")
    consumer_name: str = Field(f"{socket.gethostname()}-{os.getpid()}", description="this worker in the group")
    max_deliveries: int = Field(5, description="an event delivered this often without success goes to the dead letters")
    claim_idle_seconds: float = Field(
        15.0,
        gt=0,
        description="events pending this long with a dead worker are claimed; a consumer idle this long, "
        "with nothing pending and no heartbeat, is removed from the group",
    )
    heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="a worker's heartbeat lives this long and is renewed every third of it: a worker "
        "silent longer is taken as gone (ipamctl status, the consumer group's clean-up)",
    )
    parallel_nodes: int = Field(8, description="nodes maintained at once by this worker")
    node_lock_seconds: float = Field(
        20.0,
        description="lease of the per-node lock, renewed every step; a dead worker's lock frees itself after this long",
    )
    resync_interval_seconds: float = Field(60.0, description="full resync of every node against the cloud")
    cloud_view_max_age_seconds: float = Field(
        120.0,
        gt=0,
        description="an instance's interfaces in the cloud view older than this are read again before "
        "a maintenance uses them (the view is read in full every resync)",
    )
    stale_reservation_seconds: float = Field(
        120.0,
        description="a release reservation older than this was "
        "left by a crashed worker and is settled against the cloud",
    )
    excess_release_delay_seconds: float = Field(
        180.0,
        description="free addresses above the watermark are given back only once the node has been in "
        "excess this long (Cilium's excess-ip-release-delay): what the worker assigned for callers who "
        "have since left is not undone at once, nor assigned again the next minute",
    )
    prefix_delegation: bool = Field(
        False,
        description="IPv4 in /28 prefixes (16 addresses per interface slot) on Nitro instance types, for "
        "nodes whose spec leaves prefix_delegation unset",
    )
    prefix_backoff_seconds: float = Field(
        120.0,
        gt=0,
        description="how long a subnet that had no free /28 gets no prefix request (secondaries meanwhile)",
    )
    leaked_interface_grace_seconds: float = Field(
        300.0, description="our detached interfaces older than this are deleted"
    )
    gc_interval_seconds: float = Field(300.0, description="how often leaked interfaces are looked for")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("cloud")
    @classmethod
    def _known_cloud(cls, name: str) -> str:
        if name not in CLOUDS:
            raise ValueError(unknown_cloud(name))
        return name
