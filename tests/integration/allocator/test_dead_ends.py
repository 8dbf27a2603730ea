"""Families a node does not enable, callers waiting per family, and dead ends that fail at once."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import events_pb2
from ipam.v1 import nodes_pb2 as npb
from tests.integration.allocator.test_allocator_api import events_for
from tests.support.api import Api, expect_error
from tests.support.polling import poll


def _info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def test_ipv6_asked_of_an_ipv4_only_node_is_refused_at_once_and_publishes_nothing(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)  # nothing needed: no event of its own
    api.seed(node, 2)
    started = time.monotonic()
    error = expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="v6", wait_for_refill=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IPV6_DISABLED",
    )
    assert time.monotonic() - started < 2 and node in error.details()
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip="2001:db8::100", owner="v6"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IPV6_DISABLED",
    )
    stats = api.stats(node)
    assert (stats.waiting_ipv4, stats.waiting_ipv6, stats.needed_ips) == (0, 0, 0)
    assert events_for(backend, node) == []
    assert api.dump(node) == ({}, {})


def test_an_ipv6_waiter_is_counted_for_ipv6_never_for_ipv4(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    node = api.create_node(ipv6_enabled=True, pre_allocate=0, pre_allocate_set=True)
    api.seed(node, 2)  # IPv4 has free addresses; IPv6 none
    result: dict[str, object] = {}

    def wait() -> None:
        try:
            result["reply"] = api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="v6", wait_for_refill=True), timeout=10
            )
        except grpc.RpcError as exc:
            result["error"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    poll(lambda: api.stats(node).waiting_ipv6 == 1)
    stats = api.stats(node)
    assert (stats.waiting_ipv4, stats.needed_ips) == (0, 0)
    events = events_for(backend, node)
    assert [e.kind for e in events] == [events_pb2.PoolEvent.KIND_DEFICIT]  # the waiter asked for a refill
    api.seed(node, 0, 1)
    waiter.join(10)
    assert "error" not in result, result.get("error")
    assert result["reply"].ipv6.ip == "2001:db8::100"  # type: ignore[attr-defined]
    assert api.stats(node).waiting_ipv6 == 0


def test_a_waiter_on_a_node_keeping_no_free_address_requests_a_refill(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    # pre_allocate 0: the watermark needs nothing, so only the waiting caller can ask for an address.
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    assert events_for(backend, node) == []
    with pytest.raises(grpc.RpcError):
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="w", wait_for_refill=True), timeout=1
        )
    events = events_for(backend, node)
    assert [e.kind for e in events] == [events_pb2.PoolEvent.KIND_DEFICIT]  # the waiter asked for a refill


def test_a_pool_full_up_to_max_allocate_fails_waiting_callers_at_once(api: Api) -> None:
    node = api.create_node(max_allocate=2)
    api.seed(node, 2)
    for owner in ("a", "b"):
        api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=5)
    assert api.stats(node).needed_ips == 0  # max_allocate: no refill is requested
    started = time.monotonic()
    error = expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="c", wait_for_refill=True),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_AT_MAX_ALLOCATE",
    )
    assert time.monotonic() - started < 2
    assert "refill has been requested" not in error.details()


def test_owner_not_found_names_the_owner(api: Api) -> None:
    node = api.node_with_pool(2)
    error = expect_error(
        api.alloc.Release,
        pb.ReleaseRequest(node=node, owner="pod-nobody"),
        grpc.StatusCode.NOT_FOUND,
        "OWNER_NOT_FOUND",
    )
    assert "pod-nobody" in error.details()


def test_ip_already_allocated_names_the_owner_to_admin_callers_only(api: Api) -> None:
    node = api.node_with_pool(2)
    ip = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod-a"), timeout=5)
    request = pb.AllocateRequest(node=node, ip=ip.ipv4.ip, owner="pod-b")
    admin = expect_error(api.admin_alloc.Allocate, request, grpc.StatusCode.ALREADY_EXISTS, "IP_ALREADY_ALLOCATED")
    assert "pod-a" in admin.details() and _info(admin).metadata["owner"] == "pod-a"
    client = expect_error(api.alloc.Allocate, request, grpc.StatusCode.ALREADY_EXISTS, "IP_ALREADY_ALLOCATED")
    assert "pod-a" not in client.details() and "owner" not in _info(client).metadata


def test_switching_ipv6_off_makes_its_free_addresses_excess_for_the_worker(api: Api, backend) -> None:  # type: ignore[no-untyped-def]
    spec = dict(pre_allocate=0, pre_allocate_set=True)
    node = api.create_node(ipv6_enabled=True, **spec)
    api.seed(node, 0, 4)
    api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="v6"), timeout=5)
    assert events_for(backend, node) == []
    api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=npb.NodeSpec(name=node, ipv6_enabled=False, **spec)), timeout=5)
    assert api.stats(node).excess_ipv6 == 3  # release_excess off: a family switched off gives back all the same
    events = events_for(backend, node)
    assert [e.kind for e in events] == [events_pb2.PoolEvent.KIND_EXCESS]


def test_the_last_cloud_error_is_shown_by_get_node_and_list_nodes_until_cleared(api: Api) -> None:
    node = api.create_node()
    before = int(time.time() * 1000)
    api.nodes.SetNodeError(npb.SetNodeErrorRequest(node=node, error="instance i-0 not found"), timeout=5)
    shown = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert shown.last_error == "instance i-0 not found" and shown.last_error_ms >= before - 1000
    listed = {n.spec.name: n for n in api.nodes.ListNodes(npb.ListNodesRequest(), timeout=5).nodes}
    assert listed[node].last_error == "instance i-0 not found"
    api.nodes.SetNodeError(npb.SetNodeErrorRequest(node=node), timeout=5)
    cleared = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert (cleared.last_error, cleared.last_error_ms) == ("", 0)
    unknown = npb.SetNodeErrorRequest(node="no-such-node", error="x")
    expect_error(api.nodes.SetNodeError, unknown, grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND")
