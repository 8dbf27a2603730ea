"""Every Allocator RPC against the real server: success, each error's status and reason."""

from __future__ import annotations

import ipaddress
import threading
import time

import grpc
import pytest
import redis

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import events_pb2
from ipam.v1 import nodes_pb2 as npb
from tests.integration.allocator.conftest import Backend
from tests.support.api import Api, expect_error, reason_of
from tests.support.polling import poll


def test_allocate_next_ipv4_carries_the_interface(api: Api) -> None:
    node = api.node_with_pool(4)
    reply = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod-a"), timeout=5)
    r = reply.ipv4
    assert ipaddress.ip_address(r.ip) in ipaddress.ip_network("10.20.0.0/16")
    assert (r.owner, r.pool, r.interface_id, r.primary_mac, r.gateway_ip, r.interface_number) == (
        "pod-a",
        "default",
        "eni-test0",
        "02:42:ac:11:00:02",
        "10.20.0.1",
        "0",
    )
    assert list(r.cidrs) == ["10.20.0.0/16"]
    assert not reply.HasField("ipv6")
    assert api.dump(node)[0] == {r.ip: "pod-a"}


def test_allocate_next_dual_stack_takes_both_families(api: Api) -> None:
    node = api.node_with_pool(2, 2)
    reply = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="pod-b"), timeout=5)
    assert ipaddress.ip_address(reply.ipv4.ip).version == 4
    assert ipaddress.ip_address(reply.ipv6.ip).version == 6
    assert api.dump(node) == ({reply.ipv4.ip: "pod-b"}, {reply.ipv6.ip: "pod-b"})


def test_dual_stack_takes_nothing_when_one_family_is_empty(api: Api) -> None:
    node = api.node_with_pool(2, 0, ipv6_enabled=True)
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, owner="pod-c"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
    )
    assert api.dump(node) == ({}, {})


def test_empty_pool_is_resource_exhausted_and_publishes_one_event(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    node = api.node_with_pool(1)
    api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="o1"), timeout=5)
    for _ in range(3):
        expect_error(
            api.alloc.AllocateNext,
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="o2"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "POOL_EMPTY",
        )
    events = events_for(backend, node)
    # CreateNode (empty pool, needs 8) published one; every later call found it still pending.
    assert len(events) == 1
    assert events[0].kind == events_pb2.PoolEvent.KIND_DEFICIT and api.stats(node).needed_ips == 8


def redis_client(backend) -> redis.Redis | redis.RedisCluster:  # type: ignore[no-untyped-def]
    """A direct client of the suite's Redis, for what only Redis shows (the events stream)."""
    if backend.cluster:
        return redis.RedisCluster(host="127.0.0.1", port=backend.server.startup_nodes[0][1])
    return redis.Redis.from_url(backend.url)


def events_for(backend, node: str) -> list[events_pb2.PoolEvent]:  # type: ignore[no-untyped-def]
    client = redis_client(backend)
    try:
        entries = client.xrange("ipam:events")
    finally:
        client.close()
    events = [events_pb2.PoolEvent.FromString(fields[b"event"]) for _, fields in entries]
    return [e for e in events if e.node == node]


def test_skip_sync_upstream_publishes_nothing(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    api.seed(node, 3)
    api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=npb.NodeSpec(name=node, pre_allocate=3)), timeout=5)
    assert events_for(backend, node) == []  # 3 free, watermark 3: nothing needed yet
    api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="a", skip_sync_upstream=True), timeout=5
    )
    assert api.stats(node).needed_ips == 1
    assert events_for(backend, node) == []
    api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="b"), timeout=5)
    events = events_for(backend, node)
    assert [e.kind for e in events] == [events_pb2.PoolEvent.KIND_DEFICIT] and api.stats(node).needed_ips == 2


def test_ipv6_above_its_watermark_counts_as_excess_and_is_published_only_with_release_on(
    api: Api,
    backend,  # type: ignore[no-untyped-def]
) -> None:
    # pre_allocate 0 and max_above_watermark 2: an empty node needs nothing, 2 IPv4 are no excess.
    spec = dict(ipv6_enabled=True, pre_allocate=0, pre_allocate_set=True, max_above_watermark=2)
    releasing = api.create_node(release_excess=True, **spec)
    keeping = api.create_node(**spec)
    for node in (releasing, keeping):
        api.seed(node, 2, 12)  # IPv6: 10 above the watermark (AddAddresses, the worker's call, publishes nothing)
        stats = api.stats(node)
        assert (stats.excess_ips, stats.needed_ipv6, stats.excess_ipv6) == (0, 0, 10)
        api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="pod"), timeout=5)
        assert api.stats(node).excess_ipv6 == 9
    events = events_for(backend, releasing)
    assert [e.kind for e in events] == [events_pb2.PoolEvent.KIND_EXCESS]
    assert events_for(backend, keeping) == []


def test_only_the_release_that_takes_the_pool_past_its_excess_line_publishes(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    # pre_allocate 0, max_above_watermark 1: one free address is no excess, two are one too many.
    spec = dict(pre_allocate=0, pre_allocate_set=True, max_above_watermark=1)
    releasing = api.create_node(release_excess=True, **spec)
    keeping = api.create_node(**spec)
    for node in (releasing, keeping):
        api.seed(node, 2)  # one address of excess, which AddAddresses (the worker's call) does not announce
        for owner in ("a", "b"):  # 1 free, then 0: no excess, no deficit
            api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=5)
        api.alloc.Release(pb.ReleaseRequest(node=node, owner="a"), timeout=5)  # 1 free: no excess yet
        assert events_for(backend, node) == []
        api.alloc.Release(pb.ReleaseRequest(node=node, owner="b"), timeout=5)  # 2 free: one above the line
        assert api.stats(node).excess_ips == 1
    assert [e.kind for e in events_for(backend, releasing)] == [events_pb2.PoolEvent.KIND_EXCESS]
    assert events_for(backend, keeping) == []


def test_unspecified_family_on_an_ipv4_node_is_ipv4_only(api: Api) -> None:
    node = api.node_with_pool(2, 2, ipv6_enabled=False)
    reply = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="pod-v4"), timeout=5)
    assert reply.ipv4.ip and not reply.HasField("ipv6")


def test_idempotency_key_returns_the_same_addresses(api: Api) -> None:
    node = api.node_with_pool(4, 4)
    request = pb.AllocateNextRequest(node=node, owner="pod-d", idempotency_key="container-1/eth0")
    first = api.alloc.AllocateNext(request, timeout=5)
    again = api.alloc.AllocateNext(request, timeout=5)
    assert (again.ipv4.ip, again.ipv6.ip) == (first.ipv4.ip, first.ipv6.ip)
    other = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="pod-d", idempotency_key="k2"), timeout=5)
    assert other.ipv4.ip != first.ipv4.ip
    assert len(api.dump(node)[0]) == 2


def test_allocate_specific_and_its_errors(api: Api) -> None:
    node = api.node_with_pool(4)
    ip = "10.20.0.11"
    reply = api.alloc.Allocate(pb.AllocateRequest(node=node, ip=ip, owner="pod-e"), timeout=5)
    assert reply.result.ip == ip and reply.result.interface_id == "eni-test0"
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip=ip, owner="pod-f"),
        grpc.StatusCode.ALREADY_EXISTS,
        "IP_ALREADY_ALLOCATED",
    )
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip="10.99.0.1", owner="pod-f"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IP_NOT_IN_POOL",
    )
    api.alloc.ExcludeIP(pb.ExcludeIPRequest(node=node, ip="10.20.0.12", owner="ops"), timeout=5)
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip="10.20.0.12", owner="pod-f"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IP_EXCLUDED",
    )
    assert api.dump(node)[0] == {ip: "pod-e", "10.20.0.12": "ops (excluded)"}


def test_release_by_ip_and_by_owner(api: Api) -> None:
    node = api.node_with_pool(6, 2)
    a = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="pod-g"), timeout=5)
    b = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod-g"), timeout=5)
    c = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod-h"), timeout=5)
    released = api.alloc.Release(pb.ReleaseRequest(node=node, ip=c.ipv4.ip), timeout=5).released_ips
    assert list(released) == [c.ipv4.ip]
    released = api.alloc.Release(pb.ReleaseRequest(node=node, owner="pod-g"), timeout=5).released_ips
    assert sorted(released) == sorted([a.ipv4.ip, a.ipv6.ip, b.ipv4.ip])
    assert api.dump(node) == ({}, {})
    expect_error(
        api.alloc.Release, pb.ReleaseRequest(node=node, ip=c.ipv4.ip), grpc.StatusCode.NOT_FOUND, "IP_NOT_ALLOCATED"
    )
    expect_error(
        api.alloc.Release, pb.ReleaseRequest(node=node, owner="pod-g"), grpc.StatusCode.NOT_FOUND, "OWNER_NOT_FOUND"
    )
    # A released address is handed out again (cooldown 0 in this suite).
    again = {
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"p{i}"), timeout=5
        ).ipv4.ip
        for i in range(6)
    }
    assert c.ipv4.ip in again


def test_excluded_address_is_never_handed_out(api: Api) -> None:
    node = api.node_with_pool(3)
    api.alloc.ExcludeIP(pb.ExcludeIPRequest(node=node, ip="10.20.0.10", owner="ops"), timeout=5)
    got = {
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"p{i}"), timeout=5
        ).ipv4.ip
        for i in range(2)
    }
    assert got == {"10.20.0.11", "10.20.0.12"}
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="p9"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
    )
    assert api.stats(node).used_ips == 3  # the excluded address counts as used, as in Cilium


def test_excluding_an_allocated_address_keeps_it_aside_after_release(api: Api) -> None:
    node = api.node_with_pool(2)
    ip = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="p"), timeout=5).ipv4.ip
    api.alloc.ExcludeIP(pb.ExcludeIPRequest(node=node, ip=ip, owner="ops"), timeout=5)
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)
    assert api.dump(node)[0] == {ip: "ops (excluded)"}
    other = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="q"), timeout=5)
    assert other.ipv4.ip != ip


def test_expiration_timer_fires_and_stop_needs_the_uuid(api: Api) -> None:
    node = api.node_with_pool(4)
    doomed = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="a", expiration_seconds=1), timeout=5
    ).ipv4
    kept = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="b", expiration_seconds=1), timeout=5
    ).ipv4
    assert doomed.expiration_uuid and kept.expiration_uuid and doomed.expiration_uuid != kept.expiration_uuid
    expect_error(
        api.alloc.StopExpirationTimer,
        pb.StopExpirationTimerRequest(node=node, ip=kept.ip, expiration_uuid=doomed.expiration_uuid),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPIRATION_UUID_MISMATCH",
    )
    api.alloc.StopExpirationTimer(
        pb.StopExpirationTimerRequest(node=node, ip=kept.ip, expiration_uuid=kept.expiration_uuid), timeout=5
    )
    poll(lambda: doomed.ip not in api.dump(node)[0])
    assert api.dump(node)[0] == {kept.ip: "b"}
    expect_error(
        api.alloc.StopExpirationTimer,
        pb.StopExpirationTimerRequest(node=node, ip=kept.ip, expiration_uuid=kept.expiration_uuid),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_TIMER_RUNNING",
    )


def test_start_expiration_timer_replaces_the_uuid(api: Api) -> None:
    node = api.node_with_pool(2)
    ip = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="a"), timeout=5).ipv4.ip
    first = api.alloc.StartExpirationTimer(
        pb.StartExpirationTimerRequest(node=node, ip=ip, timeout_seconds=600), timeout=5
    ).expiration_uuid
    second = api.alloc.StartExpirationTimer(
        pb.StartExpirationTimerRequest(node=node, ip=ip, timeout_seconds=1), timeout=5
    ).expiration_uuid
    assert first != second
    poll(lambda: ip not in api.dump(node)[0])
    expect_error(
        api.alloc.StartExpirationTimer,
        pb.StartExpirationTimerRequest(node=node, ip=ip, timeout_seconds=5),
        grpc.StatusCode.NOT_FOUND,
        "IP_NOT_ALLOCATED",
    )


def test_release_clears_the_timer(api: Api) -> None:
    node = api.node_with_pool(1)
    req = pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="a", expiration_seconds=1)
    ip = api.alloc.AllocateNext(req, timeout=5).ipv4.ip
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)
    again = api.alloc.Allocate(pb.AllocateRequest(node=node, ip=ip, owner="b"), timeout=5).result
    assert again.expiration_uuid == ""
    # The old timer is gone: a second pool's timer, due at the same time, fires and ours does not.
    other = api.node_with_pool(1)
    other_ip = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=other, family=pb.FAMILY_IPV4, owner="c", expiration_seconds=1), timeout=5
    ).ipv4.ip
    poll(lambda: other_ip not in api.dump(other)[0])
    assert api.dump(node)[0] == {ip: "b"}


def test_pools_are_separate(api: Api) -> None:
    node = api.node_with_pool(2)
    api.seed(node, 2, pool="blue", base="10.21.0.0")
    blue = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, pool="blue", family=pb.FAMILY_IPV4, owner="p"), timeout=5
    ).ipv4
    assert blue.pool == "blue" and blue.ip.startswith("10.21.")
    assert api.dump(node) == ({}, {}) and api.dump(node, "blue")[0] == {blue.ip: "p"}
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, pool="green", owner="p"),
        grpc.StatusCode.NOT_FOUND,
        "POOL_NOT_FOUND",
    )


def test_dump_debug_status_and_vpc_cidrs(api: Api, backend: Backend) -> None:
    node = api.node_with_pool(2)
    status = api.alloc.DebugStatus(pb.DebugStatusRequest(), timeout=5)
    assert "nodes:" in status.status
    # Where it writes: the one Redis, or the cluster's three masters (no replicas here).
    expected = ("cluster", "", 3) if backend.cluster else ("single", backend.url.split("//")[1].split("/")[0], 1)
    assert (status.redis.mode, status.redis.master, status.redis.masters) == expected
    assert (status.redis.replicas, status.redis.min_replicas) == (0, 0)
    assert list(api.alloc.GetVpcCIDRs(pb.GetVpcCIDRsRequest(node=node), timeout=5).cidrs) == ["10.20.0.0/16"]
    expect_error(
        api.alloc.GetVpcCIDRs, pb.GetVpcCIDRsRequest(node="no-such-node"), grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND"
    )
    expect_error(api.alloc.Dump, pb.DumpRequest(node="no-such-node"), grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND")


def test_wait_for_refill_returns_when_the_worker_adds_addresses(api: Api) -> None:
    node = api.node_with_pool(0)
    result: dict[str, object] = {}

    def caller() -> None:
        try:
            result["reply"] = api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="w", wait_for_refill=True), timeout=10
            )
        except grpc.RpcError as exc:
            result["error"] = exc

    thread = threading.Thread(target=caller)
    thread.start()
    # The caller is waiting once the deficit event exists and nothing was answered.
    poll(lambda: api.stats(node).needed_ips == 8 and thread.is_alive())
    api.seed(node, 1)
    thread.join(10)
    assert "error" not in result, result.get("error")
    assert result["reply"].ipv4.ip == "10.20.0.10"  # type: ignore[attr-defined]


def test_wait_for_refill_fails_within_the_deadline(api: Api) -> None:
    node = api.node_with_pool(0)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="w", wait_for_refill=True), timeout=1.0
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(info.value) == "POOL_EMPTY"
    assert time.monotonic() - started < 1.5


def test_node_at_capacity_fails_at_once_with_its_reason(api: Api) -> None:
    node = api.node_with_pool(0)
    api.nodes.SetInterfaces(npb.SetInterfacesRequest(node=node, deficit_reason="at-capacity"), timeout=5)
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="w", wait_for_refill=True),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "NODE_AT_CAPACITY",
    )
