"""The cluster pool end to end, no cloud at all: a real Redis, the real allocator and real worker
processes with `IPAM_CLOUD=cluster-pool`; nodes named by nothing but their name."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker.providers.cluster_pool import BlockStore
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

CIDR = ipaddress.IPv4Network("10.128.0.0/22")  # 63 blocks to carve


@dataclass
class Cluster:
    api: Api
    allocator: AllocatorProcess
    redis_url: str
    nodes: list[str] = field(default_factory=list)  # the test's: deleted after it

    def worker(self, cluster: str, **settings: object) -> WorkerProcess:
        settings = {"cluster_pool_cidrs": str(CIDR), "cluster_pool_blocks_per_node": 8, **settings}
        return WorkerProcess(
            self.redis_url, self.allocator.address, "", cloud="cluster-pool", cluster_name=cluster, **settings
        )

    def blocks(self, cluster: str) -> BlockStore:
        return BlockStore(redis.Redis.from_url(self.redis_url), cluster)

    def node(self, **spec: object) -> str:
        """A node with no instance id or type: on bare metal there is none."""
        spec.setdefault("instance_type", "")
        self.nodes.append(self.api.create_node(**spec))
        return self.nodes[-1]

    def pool(self, node: str) -> set[str]:
        dump = self.api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
        return set(dump.ipv4) | set(dump.free_ipv4)

    def allocate(self, node: str, owner: str) -> str:
        request = pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner, wait_for_refill=True)
        return self.api.alloc.AllocateNext(request, timeout=30).ipv4.ip

    def release(self, node: str, owner: str) -> None:
        self.api.alloc.Release(pb.ReleaseRequest(node=node, owner=owner), timeout=5)


@pytest.fixture(scope="module")
def allocator() -> Iterator[tuple[RedisServer, AllocatorProcess, Api]]:
    with RedisServer() as server, AllocatorProcess(server.url) as allocator:
        api = Api(allocator.address)
        yield server, allocator, api
        api.close()


@pytest.fixture
def cluster(allocator: tuple[RedisServer, AllocatorProcess, Api]) -> Iterator[Cluster]:
    """The module's allocator; a test's nodes are deleted after it (the next test's workers would
    maintain them in a cluster pool of their own)."""
    server, process, api = allocator
    cluster = Cluster(api, process, server.url)
    yield cluster
    for node in cluster.nodes:
        api.nodes.DeleteNode(npb.DeleteNodeRequest(name=node), timeout=5)


def addresses(blocks: BlockStore, owner: str) -> set[str]:
    return {str(a) for b in blocks.blocks_of(owner) for a in ipaddress.IPv4Network(b.prefix)}


def test_a_deficit_is_met_with_blocks_and_excess_goes_back_whole(cluster: Cluster) -> None:
    name = uuid.uuid4().hex
    node = cluster.node(pre_allocate=20, max_above_watermark=8, release_excess=True)
    blocks = cluster.blocks(name)
    with cluster.worker(name) as worker:
        poll(lambda: cluster.api.stats(node).available_ips == 32, timeout=30, describe=lambda: worker.log_tail(40))
        assert f"(cloud cluster-pool: /28 blocks from {CIDR}, up to 8 per node and CIDR)" in worker.log_text()
        assert [b.prefix for b in blocks.blocks_of(node)] == ["10.128.0.16/28", "10.128.0.32/28"]
        assert cluster.pool(node) == addresses(blocks, node)
        shown = cluster.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
        assert [i.id for i in shown.interfaces] == [f"cp0-{node}"] and shown.last_error == ""

        # 40 callers: ⌈(40 + 20 − 32) / 16⌉ = 2 more blocks, the lowest free ones.
        for i in range(40):
            cluster.allocate(node, f"pod-{i}")
        poll(
            lambda: len(blocks.blocks_of(node)) == 4 and cluster.api.stats(node).needed_ips == 0,
            timeout=30,
            describe=lambda: (
                f"blocks {[b.prefix for b in blocks.blocks_of(node)]}, {cluster.api.stats(node)}; "
                + worker.log_tail(40)
            ),
        )
        assert cluster.pool(node) == addresses(blocks, node)

        # 40 gone: the free blocks above the watermark go back whole, the node keeps its watermark.
        for i in range(40):
            cluster.release(node, f"pod-{i}")
        poll(lambda: len(blocks.blocks_of(node)) == 2, timeout=30, describe=worker.log_tail)
        assert cluster.pool(node) == addresses(blocks, node)
        assert cluster.api.stats(node).available_ips == 32 and blocks.free_blocks(CIDR) == 61
        assert worker.stop() == 0, worker.log_text()[-3000:]


def test_a_restarted_worker_adopts_what_a_dead_one_carved(cluster: Cluster) -> None:
    name = uuid.uuid4().hex
    node = cluster.node(pre_allocate=8)
    blocks = cluster.blocks(name)
    with cluster.worker(name) as worker:
        poll(lambda: cluster.api.stats(node).available_ips == 16, timeout=30, describe=worker.log_tail)
        worker.kill()
    # A worker that carved a block and died before telling the allocator.
    blocks.carve(CIDR, node, 1)
    cluster.api.nodes.UpdateNode(
        npb.UpdateNodeRequest(spec=npb.NodeSpec(name=node, instance_type="", pre_allocate=24)), timeout=5
    )
    with cluster.worker(name) as worker:
        poll(lambda: cluster.api.stats(node).available_ips == 32, timeout=30, describe=worker.log_tail)
        assert [b.prefix for b in blocks.blocks_of(node)] == ["10.128.0.16/28", "10.128.0.32/28"], worker.log_tail()
        assert cluster.pool(node) == addresses(blocks, node)
        assert worker.stop() == 0, worker.log_text()[-3000:]


def test_the_blocks_of_a_deleted_node_go_back_to_the_cluster_pool(cluster: Cluster) -> None:
    name = uuid.uuid4().hex
    kept, deleted = cluster.node(pre_allocate=8), cluster.node(pre_allocate=8)
    blocks = cluster.blocks(name)
    with cluster.worker(name, gc_interval_seconds=0.5) as worker:
        poll(lambda: len(blocks.owners(CIDR)) == 2, timeout=30, describe=worker.log_tail)
        cluster.api.nodes.DeleteNode(npb.DeleteNodeRequest(name=deleted), timeout=5)
        cluster.nodes.remove(deleted)
        poll(lambda: blocks.blocks_of(deleted) == [], timeout=30, describe=worker.log_tail)
        assert len(blocks.blocks_of(kept)) == 1 and blocks.free_blocks(CIDR) == 62
        assert worker.stop() == 0, worker.log_text()[-3000:]


def test_a_small_cluster_cidr_gives_every_one_of_its_blocks(cluster: Cluster) -> None:
    """A virtual interface has no primary address: creating one spends its blocks alone of the
    CIDR's free addresses, so the last block is still seen free."""
    name = uuid.uuid4().hex
    with cluster.worker(name, cluster_pool_cidrs="10.130.0.0/26") as worker:  # 3 blocks
        for _ in range(3):
            node = cluster.node(pre_allocate=8)
            poll(lambda: cluster.api.stats(node).available_ips == 16, timeout=30, describe=worker.log_tail)  # noqa: B023
        assert cluster.blocks(name).free_blocks(ipaddress.IPv4Network("10.130.0.0/26")) == 0
        assert worker.stop() == 0, worker.log_text()[-3000:]


def test_two_workers_on_one_cluster_cidr_never_hand_out_a_block_twice(cluster: Cluster) -> None:
    name = uuid.uuid4().hex
    blocks = cluster.blocks(name)
    with cluster.worker(name) as first, cluster.worker(name) as second:
        poll(lambda: "consuming" in first.log_text() and "consuming" in second.log_text(), timeout=30)
        nodes = [cluster.node(pre_allocate=40) for _ in range(6)]  # 3 blocks each, taken by either
        poll(lambda: all(cluster.api.stats(n).available_ips == 48 for n in nodes), timeout=60)
        logs = first.log_text() + second.log_text()
        assert first.stop() == 0 and second.stop() == 0, logs[-3000:]
    pools = [cluster.pool(n) for n in nodes]
    assert sum(len(p) for p in pools) == len(set().union(*pools)) == 6 * 48
    assert all(ipaddress.IPv4Address(a) in CIDR for p in pools for a in p)
    assert pools == [addresses(blocks, n) for n in nodes]
    assert len(blocks.owners(CIDR)) == 18
