"""The cluster-pool provider's calls against a real Redis: a node's blocks on its virtual interfaces,
carved, read back and given back as the worker's provider Protocol says."""

from __future__ import annotations

import uuid

import pytest
import redis
from prometheus_client import CollectorRegistry

from services.cloudworker.metrics import CloudMetrics
from services.cloudworker.providers import cluster_pool
from services.cloudworker.providers.errors import NotFound, SubnetFull, Transient
from services.cloudworker.settings import WorkerSettings
from tests.support.redis_server import RedisServer, free_port

CIDRS = "10.128.0.0/26,10.129.0.0/24"  # 3 and 15 blocks to carve


@pytest.fixture
def provider(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> cluster_pool.ClusterPoolProvider:
    monkeypatch.setenv("IPAM_CLUSTER_POOL_CIDRS", CIDRS)
    monkeypatch.setenv("IPAM_CLUSTER_POOL_BLOCKS_PER_NODE", "4")
    settings = WorkerSettings(cloud="cluster-pool")
    return cluster_pool.from_settings(settings, cluster=uuid.uuid4().hex, redis=redis.Redis.from_url(redis_server.url))


def test_a_node_s_blocks_are_its_virtual_interfaces(provider: cluster_pool.ClusterPoolProvider) -> None:
    assert provider.node_instance("node-a", "", "") == ("node-a", "")
    assert provider.list_interfaces("node-a") == []
    created = provider.create_interface(
        instance_id="node-a",
        node="node-a",
        subnet_id="10.128.0.0/26",
        security_group_ids=(),
        device_index=0,
        ipv4_count=0,
        ipv4_prefix_count=2,
    )
    assert (created.id, created.device_index, created.ipv4_prefixes) == (
        "cp0-node-a",
        0,
        ("10.128.0.16/28", "10.128.0.32/28"),
    )
    assert created.gateway_ip == "10.128.0.1" and created.pool_ipv4[0] == "10.128.0.16"
    with pytest.raises(SubnetFull):  # one block left in the first CIDR
        provider.assign_prefixes(created.id, 2)
    change = provider.assign_prefixes(created.id, 1)
    assert change.prefixes == ("10.128.0.48/28",) and len(change.addresses) == 16
    assert change.interface.ipv4_prefixes == (*created.ipv4_prefixes, "10.128.0.48/28")
    other = provider.create_interface(
        instance_id="node-b",
        node="node-b",
        subnet_id="10.129.0.0/24",
        security_group_ids=(),
        device_index=1,
        ipv4_count=20,  # whole blocks: two
    )
    assert other.id == "cp1-node-b" and other.ipv4_prefixes == ("10.129.0.16/28", "10.129.0.32/28")
    assert [(s.id, s.free_addresses) for s in provider.list_subnets(provider.cluster)] == [
        ("10.128.0.0/26", 0),
        ("10.129.0.0/24", 13 * 16),
    ]
    assert [(owner, i.id) for owner, i in provider.list_vpc_interfaces(provider.cluster)] == [
        ("node-a", "cp0-node-a"),
        ("node-b", "cp1-node-b"),
    ]
    assert provider.instance_limits("").capacity() == 2 * 4  # blocks: 4 per CIDR
    assert provider.vpc_cidrs(provider.cluster) == CIDRS.split(",")


def test_blocks_go_back_whole(provider: cluster_pool.ClusterPoolProvider) -> None:
    created = provider.create_interface(
        instance_id="node-a",
        node="node-a",
        subnet_id="10.128.0.0/26",
        security_group_ids=(),
        device_index=0,
        ipv4_count=0,
        ipv4_prefix_count=3,
    )
    first, second, _ = created.ipv4_prefixes
    some = created.pool_ipv4[:20]  # the first block whole, 4 of the second
    change = provider.unassign_addresses(created.id, some)
    assert change.prefixes == (first,) and change.addresses == created.pool_ipv4[:16]
    assert provider.unassign_prefixes(created.id, [first]).prefixes == ()  # gone already
    assert provider.unassign_prefixes("cp0-node-b", [second]).prefixes == ()  # node-a's
    again = provider.assign_prefixes(created.id, 1)  # the lowest free block: the one given back
    assert again.prefixes == (first,)
    assert provider.delete_interface(created.id) and provider.list_interfaces("node-a") == []


def test_the_blocks_of_an_owner_that_is_no_node_are_leaked(provider: cluster_pool.ClusterPoolProvider) -> None:
    for node in ("node-a", "node-b"):
        provider.create_interface(
            instance_id=node,
            node=node,
            subnet_id="10.129.0.0/24",
            security_group_ids=(),
            device_index=1,
            ipv4_count=0,
            ipv4_prefix_count=1,
        )
    assert provider.list_leaked_interfaces(300) == []  # the nodes unknown: none
    (leaked,) = provider.list_leaked_interfaces(300, {"node-a"})
    assert leaked.id == "cp1-node-b" and provider.delete_interface(leaked.id)
    assert provider.list_leaked_interfaces(300, {"node-a"}) == [] and provider.list_interfaces("node-b") == []


def test_its_calls_are_reported_as_the_cloud_s(redis_server: RedisServer) -> None:
    registry = CollectorRegistry()
    provider = cluster_pool.from_settings(
        WorkerSettings(cloud="cluster-pool", cluster_pool_cidrs=CIDRS),
        cluster=uuid.uuid4().hex,
        redis=redis.Redis.from_url(redis_server.url),
        observer=CloudMetrics(registry).observer("cluster-pool"),
    )
    provider.assign_prefixes("cp1-node-a", 2)
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    provider.blocks = cluster_pool.BlockStore(
        redis.Redis.from_url(nobody, socket_timeout=0.5), provider.cluster, observer=provider.blocks.observer
    )
    with pytest.raises(Transient):
        provider.assign_prefixes("cp1-node-a", 1)

    def calls(operation: str, code: str = "OK") -> float | None:
        labels = {"provider": "cluster-pool", "operation": operation, "response_code": code}
        return registry.get_sample_value("ipam_worker_cloud_api_duration_seconds_count", labels)

    assert (calls("carve"), calls("blocks_of"), calls("carve", "ConnectionError")) == (1, 1, 1)


def test_unknown_interfaces_and_a_dead_redis_are_provider_errors(
    provider: cluster_pool.ClusterPoolProvider, redis_server: RedisServer
) -> None:
    with pytest.raises(NotFound):
        provider.assign_prefixes("eni-123", 1)
    with pytest.raises(NotFound):
        provider.assign_prefixes("cp7-node-a", 1)
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    provider.blocks = cluster_pool.BlockStore(redis.Redis.from_url(nobody, socket_timeout=0.5), provider.cluster)
    with pytest.raises(Transient):
        provider.list_interfaces("node-a")
