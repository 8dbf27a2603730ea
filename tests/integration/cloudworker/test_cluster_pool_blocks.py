"""The cluster pool's blocks in a real Redis: carved lowest free first, all or none, never twice,
given back only by their owner."""

from __future__ import annotations

import ipaddress
import threading
import uuid

import pytest
import redis
import redis.cluster

from services.cloudworker.providers.cluster_pool import BlockStore, block_of
from services.cloudworker.settings import WorkerSettings
from tests.support.redis_server import RedisCluster, RedisServer

CIDR = ipaddress.IPv4Network("10.128.0.0/24")  # 16 blocks, block 0 never carved


def store(redis_server: RedisServer, cluster: str) -> BlockStore:
    blocks = BlockStore(redis.Redis.from_url(redis_server.url), cluster)
    blocks.register([CIDR])
    return blocks


def test_blocks_are_carved_lowest_free_first_and_given_back_by_their_owner(redis_server: RedisServer) -> None:
    blocks = store(redis_server, uuid.uuid4().hex)
    assert [b.prefix for b in blocks.carve(CIDR, "node-a", 2)] == ["10.128.0.16/28", "10.128.0.32/28"]
    assert [b.prefix for b in blocks.carve(CIDR, "node-b", 1)] == ["10.128.0.48/28"]
    assert blocks.give_back(CIDR, "node-b", [1]) == []  # node-a's: left as it is
    assert [b.index for b in blocks.give_back(CIDR, "node-a", [1])] == [1]
    assert [b.prefix for b in blocks.carve(CIDR, "node-b", 2)] == ["10.128.0.16/28", "10.128.0.64/28"]
    assert [b.prefix for b in blocks.blocks_of("node-b")] == ["10.128.0.16/28", "10.128.0.48/28", "10.128.0.64/28"]
    assert blocks.owners(CIDR) == {1: "node-b", 2: "node-a", 3: "node-b", 4: "node-b"}
    assert blocks.free_blocks(CIDR) == 15 - 4


def test_a_cluster_s_blocks_live_in_one_slot_of_a_redis_cluster() -> None:
    with RedisCluster(3) as server:
        client = redis.cluster.RedisCluster.from_url(server.url)
        blocks = BlockStore(client, uuid.uuid4().hex)
        blocks.register([CIDR])
        assert [b.index for b in blocks.carve(CIDR, "node-a", 2)] == [1, 2]
        assert [b.index for b in blocks.give_back(CIDR, "node-a", [1])] == [1]
        assert [b.index for b in blocks.blocks_of("node-a")] == [2] and blocks.free_blocks(CIDR) == 14
        client.close()


def test_a_carve_is_all_or_none(redis_server: RedisServer) -> None:
    blocks = store(redis_server, uuid.uuid4().hex)
    assert len(blocks.carve(CIDR, "node-a", 14)) == 14
    assert blocks.carve(CIDR, "node-b", 2) == []
    assert blocks.blocks_of("node-b") == []
    assert [b.prefix for b in blocks.carve(CIDR, "node-b", 1)] == ["10.128.0.240/28"]
    assert blocks.free_blocks(CIDR) == 0


def test_an_unregistered_cidr_is_refused(redis_server: RedisServer) -> None:
    blocks = store(redis_server, uuid.uuid4().hex)
    with pytest.raises(ValueError, match="not a cluster CIDR"):
        blocks.carve(ipaddress.IPv4Network("10.129.0.0/24"), "node-a", 1)


def test_a_cidr_overlapping_one_another_worker_registered_is_refused(redis_server: RedisServer) -> None:
    cluster = uuid.uuid4().hex
    store(redis_server, cluster)
    other = BlockStore(redis.Redis.from_url(redis_server.url), cluster)
    other.register([CIDR])  # the same CIDR again: fine
    with pytest.raises(ValueError, match="overlaps"):
        other.register([ipaddress.IPv4Network("10.128.0.0/16")])


def test_workers_carving_at_once_never_hand_out_one_block_twice(redis_server: RedisServer) -> None:
    cluster = uuid.uuid4().hex
    cidr = ipaddress.IPv4Network("10.128.0.0/20")  # 255 blocks to carve
    stores = [BlockStore(redis.Redis.from_url(redis_server.url), cluster) for _ in range(4)]
    stores[0].register([cidr])
    carved: list[list[str]] = [[] for _ in stores]

    def carve(i: int) -> None:
        while got := stores[i].carve(cidr, f"node-{i}", 3):
            carved[i].extend(b.prefix for b in got)

    threads = [threading.Thread(target=carve, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [p for prefixes in carved for p in prefixes]
    assert len(everything) == len(set(everything)) == 255  # 85 carves of 3
    assert all(ipaddress.IPv4Network(p).subnet_of(cidr) for p in everything)


def test_a_block_is_known_by_its_prefix() -> None:
    assert block_of(CIDR, "10.128.0.48/28").index == 3
    with pytest.raises(ValueError):
        block_of(CIDR, "10.128.1.0/28")


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"IPAM_CLUSTER_POOL_CIDRS": "10.0.0.0/16,10.0.128.0/20"}, "overlap"),
        ({"IPAM_CLUSTER_POOL_CIDRS": "10.0.0.1/16"}, "host bits"),
        ({"IPAM_CLUSTER_POOL_CIDRS": "fd00::/64"}, "IPv4"),
        ({"IPAM_CLUSTER_POOL_CIDRS": "10.0.0.0/28"}, "two"),
        ({"IPAM_CLUSTER_POOL_BLOCK_LENGTH": "26"}, "only /28"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], error: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=error):
        WorkerSettings()
