"""NodeManager RPCs and the worker-facing calls (AddAddresses, release handshake)."""

from __future__ import annotations

import grpc
import pytest

from clients.client import IpamClient
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import events_pb2
from ipam.v1 import nodes_pb2 as npb
from tests.support.allocator_process import ADMIN_TOKEN
from tests.support.api import Api, expect_error

from .test_allocator_api import events_for, redis_client


def test_create_get_update_delete(api: Api) -> None:
    name = api.create_node(instance_id="i-0123", subnet_ids=["subnet-a"], max_above_watermark=2)
    node = api.nodes.GetNode(npb.GetNodeRequest(name=name), timeout=5)
    assert node.spec.instance_id == "i-0123" and list(node.spec.subnet_ids) == ["subnet-a"]
    assert node.spec.pre_allocate == 8  # the default
    assert (node.stats.available_ips, node.stats.used_ips, node.stats.needed_ips) == (0, 0, 8)
    assert list(node.pools) == ["default"]
    expect_error(
        api.nodes.CreateNode,
        npb.CreateNodeRequest(spec=npb.NodeSpec(name=name)),
        grpc.StatusCode.ALREADY_EXISTS,
        "NODE_ALREADY_EXISTS",
    )
    updated = api.nodes.UpdateNode(
        npb.UpdateNodeRequest(spec=npb.NodeSpec(name=name, pre_allocate=4, min_allocate=10)), timeout=5
    )
    assert updated.stats.needed_ips == 10
    api.nodes.DeleteNode(npb.DeleteNodeRequest(name=name), timeout=5)
    expect_error(api.nodes.GetNode, npb.GetNodeRequest(name=name), grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND")
    expect_error(
        api.nodes.UpdateNode,
        npb.UpdateNodeRequest(spec=npb.NodeSpec(name=name)),
        grpc.StatusCode.NOT_FOUND,
        "NODE_NOT_FOUND",
    )
    with _admin_client(api) as client:
        assert name not in {n.spec.name for n in client.list_nodes()}


def test_stats_follow_allocations(api: Api) -> None:
    name = api.node_with_pool(10)
    for i in range(6):
        api.alloc.AllocateNext(pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner=f"p{i}"), timeout=5)
    stats = api.stats(name)
    assert (stats.available_ips, stats.used_ips, stats.needed_ips, stats.excess_ips) == (10, 6, 4, 0)


def test_interface_statistics_from_the_reported_limits(api: Api) -> None:
    name = api.create_node(first_interface_index=0)
    interfaces = [
        npb.Interface(id="eni-0", device_index=0, addresses=[f"10.1.0.{i}" for i in range(10, 19)]),
        npb.Interface(id="eni-1", device_index=1, addresses=["10.1.1.10"]),
    ]
    api.nodes.SetInterfaces(
        npb.SetInterfacesRequest(node=name, interfaces=interfaces, max_interfaces=3, ipv4_per_interface=10), timeout=5
    )
    node = api.nodes.GetNode(npb.GetNodeRequest(name=name), timeout=5)
    assert [i.id for i in node.interfaces] == ["eni-0", "eni-1"]
    # eth0 is full (9 secondaries), eth1 has room; one device slot (2) is empty; both can take addresses.
    stats = node.stats
    assert (stats.remaining_interfaces, stats.interface_candidates, stats.empty_interface_slots) == (2, 1, 1)
    assert (node.max_interfaces, node.ipv4_per_interface) == (3, 10)


def test_list_nodes_by_watermark_puts_the_biggest_deficit_first(api: Api) -> None:
    small = api.node_with_pool(6)  # needs 2
    big = api.create_node()  # needs 8
    none = api.node_with_pool(20)  # needs 0
    with _admin_client(api) as client:
        nodes = client.list_nodes(order_by_watermark=True)
    order = [n.spec.name for n in nodes if n.spec.name in (small, big, none)]
    assert order == [big, small, none]
    needed = [n.stats.needed_ips for n in nodes]
    assert needed == sorted(needed, reverse=True)


def _admin_client(api: Api) -> IpamClient:
    return IpamClient(api.address, token=ADMIN_TOKEN, timeout=5)


def test_list_nodes_comes_in_pages_that_the_client_follows(api: Api) -> None:
    mine = {api.create_node() for _ in range(5)}
    pages: list[list[str]] = []
    token = ""
    while True:
        reply = api.nodes.ListNodes(npb.ListNodesRequest(page_size=2, page_token=token), timeout=5)
        pages.append([n.spec.name for n in reply.nodes])
        token = reply.next_page_token
        if not token:
            break
    names = [n for page in pages for n in page]
    assert all(1 <= len(p) <= 2 for p in pages)
    assert names == sorted(set(names)) and mine <= set(names)  # by name, each node once
    with _admin_client(api) as client:
        assert [n.spec.name for n in client.iter_nodes(page_size=2)] == names
        assert [n.spec.name for n in client.list_nodes()] == names
        by_watermark = [n.spec.name for n in client.iter_nodes(order_by_watermark=True, page_size=3)]
    assert sorted(by_watermark) == names


def test_resync_republishes_a_lost_event(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    node = api.node_with_pool(1)  # needs 7: CreateNode published one event
    assert len(events_for(backend, node)) == 1
    client = redis_client(backend)
    client.delete(f"ipam:{{{node}}}:default:evpending")  # as if its event was lost with its marker
    client.close()
    reply = api.nodes.Resync(npb.ResyncRequest(), timeout=10)
    assert reply.nodes >= 1 and reply.events_published >= 1
    events = events_for(backend, node)
    assert len(events) == 2 and events[-1].kind == events_pb2.PoolEvent.KIND_DEFICIT


def test_add_addresses_is_idempotent(api: Api) -> None:
    name = api.create_node()
    assert len(api.seed(name, 3)) == 3
    assert api.seed(name, 3) == []
    assert api.stats(name).available_ips == 3
    api.seed(name, 4)
    interfaces = api.nodes.GetNode(npb.GetNodeRequest(name=name), timeout=5).interfaces
    assert [list(i.addresses) for i in interfaces] == [["10.20.0.10", "10.20.0.11", "10.20.0.12", "10.20.0.13"]]
    expect_error(
        api.nodes.AddAddresses,
        npb.AddAddressesRequest(node="no-such-node", ips=["10.0.0.1"]),
        grpc.StatusCode.NOT_FOUND,
        "NODE_NOT_FOUND",
    )
    expect_error(
        api.nodes.AddAddresses,
        npb.AddAddressesRequest(node=name, ips=["10.0.0.300"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_IP",
    )


def test_stats_count_the_reserved_and_the_excluded_addresses(api: Api) -> None:
    name = api.node_with_pool(4, v6=2)
    assert (api.stats(name).reserved_ips, api.stats(name).excluded_ips) == (0, 0)
    api.alloc.ExcludeIP(pb.ExcludeIPRequest(node=name, ip="10.20.0.10", owner="ops"), timeout=5)
    v4 = api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=name, count=2), timeout=5)
    v6 = api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=name, count=1, family=pb.FAMILY_IPV6), timeout=5)
    assert (len(v4.ips), len(v6.ips)) == (2, 1)
    stats = api.stats(name)
    assert (stats.reserved_ips, stats.excluded_ips) == (3, 1)
    api.nodes.AbortRelease(npb.AbortReleaseRequest(node=name, reservation_id=v4.reservation_id), timeout=5)
    assert api.stats(name).reserved_ips == 1


def test_reserved_addresses_are_never_handed_out_then_complete(api: Api) -> None:
    name = api.node_with_pool(4)
    held = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="p"), timeout=5
    ).ipv4.ip
    reply = api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=name, count=10), timeout=5)
    assert len(reply.ips) == 3 and held not in reply.ips and reply.reservation_id
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="q"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
    )
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=name, ip=reply.ips[0], owner="q"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IP_RESERVED_FOR_RELEASE",
    )
    done = api.nodes.CompleteRelease(
        npb.CompleteReleaseRequest(node=name, reservation_id=reply.reservation_id, ips=reply.ips[:2]), timeout=5
    )
    assert sorted(done.released_ips) == sorted(reply.ips[:2])
    # The one not unassigned went back to the pool.
    assert api.stats(name).available_ips == 2
    back = api.alloc.AllocateNext(pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="q"), timeout=5)
    assert back.ipv4.ip == reply.ips[2]
    expect_error(
        api.nodes.CompleteRelease,
        npb.CompleteReleaseRequest(node=name, reservation_id=reply.reservation_id),
        grpc.StatusCode.NOT_FOUND,
        "RESERVATION_NOT_FOUND",
    )


def test_abort_release_restores_the_addresses(api: Api) -> None:
    name = api.node_with_pool(3)
    reply = api.nodes.ReserveForRelease(
        npb.ReserveForReleaseRequest(node=name, count=2, interface_id="eni-test0"), timeout=5
    )
    assert len(reply.ips) == 2
    restored = api.nodes.AbortRelease(
        npb.AbortReleaseRequest(node=name, reservation_id=reply.reservation_id), timeout=5
    )
    assert sorted(restored.restored_ips) == sorted(reply.ips)
    assert api.stats(name).available_ips == 3
    none = api.nodes.ReserveForRelease(
        npb.ReserveForReleaseRequest(node=name, count=2, interface_id="eni-other"), timeout=5
    )
    assert list(none.ips) == [] and none.reservation_id == ""


def test_remove_addresses_never_drops_an_allocated_one(api: Api) -> None:
    name = api.node_with_pool(3)
    held = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="p"), timeout=5
    ).ipv4.ip
    free = [ip for ip in ("10.20.0.10", "10.20.0.11", "10.20.0.12") if ip != held]
    reply = api.nodes.RemoveAddresses(npb.RemoveAddressesRequest(node=name, ips=[held, *free]), timeout=5)
    assert sorted(reply.removed_ips) == sorted(free) and list(reply.still_allocated) == [held]
    assert list(reply.newly_lost) == [held]
    assert api.dump(name)[0] == {held: "p"}
    stats = api.stats(name)
    assert (stats.available_ips, stats.lost_ips) == (0, 1)  # kept by its owner, no longer attached
    again = api.nodes.RemoveAddresses(npb.RemoveAddressesRequest(node=name, ips=[held]), timeout=5)
    assert list(again.still_allocated) == [held] and list(again.newly_lost) == []


def test_a_lost_address_released_by_its_owner_never_returns_to_the_pool(api: Api) -> None:
    name = api.node_with_pool(2)
    held = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="p"), timeout=5
    ).ipv4.ip
    api.nodes.RemoveAddresses(npb.RemoveAddressesRequest(node=name, ips=[held]), timeout=5)
    api.alloc.Release(pb.ReleaseRequest(node=name, owner="p"), timeout=5)
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=name), timeout=5)
    assert held not in dump.free_ipv4 and held not in dump.ipv4
    assert api.stats(name).lost_ips == 0


def test_a_lost_address_attached_again_stays_its_owner_s(api: Api) -> None:
    name = api.node_with_pool(2)
    held = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="p"), timeout=5
    ).ipv4.ip
    api.nodes.RemoveAddresses(npb.RemoveAddressesRequest(node=name, ips=[held]), timeout=5)
    api.nodes.AddAddresses(
        npb.AddAddressesRequest(node=name, interface=npb.Interface(id="eni-test0"), ips=[held]), timeout=5
    )
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=name), timeout=5)
    assert held not in dump.free_ipv4 and dump.ipv4[held] == "p"
    assert (api.stats(name).lost_ips, api.stats(name).available_ips) == (0, 2)


@pytest.mark.parametrize("end", ["abort", "complete-none-unassigned"])
def test_an_address_excluded_while_reserved_stays_out_when_the_reservation_ends(api: Api, end: str) -> None:
    name = api.node_with_pool(3)
    reply = api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=name, count=1), timeout=5)
    [ip] = reply.ips
    api.admin_alloc.ExcludeIP(pb.ExcludeIPRequest(node=name, ip=ip, owner="operator"), timeout=5)
    if end == "abort":
        api.nodes.AbortRelease(npb.AbortReleaseRequest(node=name, reservation_id=reply.reservation_id), timeout=5)
    else:  # the worker unassigned another address of the reservation: none of it, here
        api.nodes.CompleteRelease(
            npb.CompleteReleaseRequest(node=name, reservation_id=reply.reservation_id, ips=["10.20.0.99"]), timeout=5
        )
    assert ip not in api.admin_alloc.Dump(pb.DumpRequest(node=name), timeout=5).free_ipv4
    owners = {
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner=f"o{i}"), timeout=5
        ).ipv4.ip
        for i in range(2)
    }
    assert ip not in owners


@pytest.mark.parametrize("count", [-1])
def test_reserve_refuses_a_negative_count(api: Api, count: int) -> None:
    name = api.node_with_pool(1)
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=name, count=count),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_COUNT",
    )


def test_a_node_keeps_each_setting_once_under_its_full_name(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    name = api.create_node(pre_allocate=3, ipv6_enabled=True, release_excess=True, first_interface_index=1)
    client = redis_client(backend)
    try:
        fields = {k.decode(): v for k, v in client.hgetall(f"ipam:{{{name}}}:node").items() if k != b"spec"}
    finally:
        client.close()
    assert fields == {
        "pre_allocate": b"3",
        "min_allocate": b"0",
        "max_allocate": b"0",
        "max_above_watermark": b"0",
        "release_excess": b"1",
        "ipv6_enabled": b"1",
        "first_interface_index": b"1",
        "created_ms": fields["created_ms"],
    }
