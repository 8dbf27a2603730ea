"""The worker's typed settings: built once at start-up from flags and `IPAM_*` variables."""

from __future__ import annotations

import ipaddress
import os
import socket

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core import contract, redis_client


class WorkerSettings(BaseSettings):
    """Every setting of `ipam-cloudworker` (flag `--ec2-qps` = variable `IPAM_EC2_QPS`)."""

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
    cloud: str = Field("aws", description="the cloud the addresses come from: aws (the one provider so far)")
    ec2_endpoint_url: str = Field("", description="EC2 endpoint (the moto server locally); empty = real AWS")
    aws_region: str = Field("us-east-1", description="AWS region")
    aws_access_key_id: SecretStr = Field(SecretStr(""), description="empty = boto3's default credential chain")
    aws_secret_access_key: SecretStr = Field(SecretStr(""), description="empty = boto3's default credential chain")
    cluster_name: str = Field("ipam", description="tags our interfaces, so leaked ones of this cluster are found")
    ec2_account_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the account's EC2 request budget (EC2's token buckets per Region) "
        "this cluster's workers use together",
    )
    ec2_qps: float = Field(
        0.0,
        ge=0,
        description="override: EC2 calls per second in one bucket for every call; 0 = EC2's own buckets",
    )
    ec2_burst: int = Field(20, ge=1, description="with ec2_qps: EC2 calls allowed in a burst")
    ipv6_gateway: str = Field(
        "fe80:ec2::1",
        description="the IPv6 gateway reported with each interface whose subnet has an IPv6 block: "
        "the VPC router's link-local address, which AWS documents for every subnet",
    )
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
    leaked_interface_grace_seconds: float = Field(
        300.0, description="our detached interfaces older than this are deleted"
    )
    gc_interval_seconds: float = Field(300.0, description="how often leaked interfaces are looked for")
    check_address_conflicts: bool | None = Field(
        None,
        description="after each assignment, read the subnet's interfaces and give back addresses the "
        "cloud handed out twice or reserved; the local EC2 does that, AWS does not, so unset it is on "
        "with an EC2 endpoint URL and off against AWS",
    )

    @property
    def checks_address_conflicts(self) -> bool:
        """Whether each assignment is followed by a read of its subnet (see check_address_conflicts)."""
        if self.check_address_conflicts is None:
            return bool(self.ec2_endpoint_url)
        return self.check_address_conflicts

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

    @field_validator("ipv6_gateway")
    @classmethod
    def _ipv6_address(cls, value: str) -> str:
        address = ipaddress.ip_address(value)  # a ValueError names the bad value
        if address.version != 6:
            raise ValueError(f"{value} is not an IPv6 address")
        return str(address)

    @field_validator("cloud")
    @classmethod
    def _known_cloud(cls, name: str) -> str:
        # Read here, not at import: the registry builds providers, which need these settings.
        from services.cloudworker.providers.registry import CLOUDS, unknown_cloud

        if name not in CLOUDS:
            raise ValueError(unknown_cloud(name))
        return name

    @model_validator(mode="after")
    def _sentinels(self) -> WorkerSettings:
        redis_client.check_sentinel_settings(self.redis_sentinels, self.redis_sentinel_master, self.redis_cluster)
        return self
