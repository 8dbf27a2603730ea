"""Fencing of the worker's changes: each carries its node lock's token, and one older than the node's
newest is refused with STALE_FENCING_TOKEN, changing nothing (on one Redis and on Redis Cluster)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from tests.support.api import Api, expect_error


def _state(api: Api, name: str) -> tuple[object, ...]:
    """Everything the worker's calls change: the pool's addresses, its reservations, the interfaces."""
    node = api.nodes.GetNode(npb.GetNodeRequest(name=name), timeout=5)
    dump = api.alloc.Dump(pb.DumpRequest(node=name), timeout=5)
    return (
        sorted(dump.ipv4),
        sorted(dump.free_ipv4),
        [(r.id, sorted(r.ips)) for r in node.reservations],
        [(i.id, sorted(i.addresses)) for i in node.interfaces],
        node.stats.deficit_reason,
    )


def test_a_stale_token_is_refused_on_every_worker_call_and_changes_nothing(api: Api) -> None:
    name = api.node_with_pool(4)
    held = api.alloc.AllocateNext(pb.AllocateNextRequest(node=name, family=pb.FAMILY_IPV4, owner="p"), timeout=5)
    reserved = api.nodes.ReserveForRelease(
        npb.ReserveForReleaseRequest(node=name, count=1, fencing_token=10), timeout=5
    )
    assert reserved.ips  # token 10 is now the node's newest
    eni = npb.Interface(id="eni-x", device_index=1, addresses=["10.20.0.50"])
    stale: list[tuple[Callable[..., object], object]] = [
        (
            api.nodes.AddAddresses,
            npb.AddAddressesRequest(node=name, interface=eni, ips=["10.20.0.50"], fencing_token=9),
        ),
        (api.nodes.SetInterfaces, npb.SetInterfacesRequest(node=name, deficit_reason="subnet-full", fencing_token=9)),
        (api.nodes.ReserveForRelease, npb.ReserveForReleaseRequest(node=name, count=2, fencing_token=9)),
        (
            api.nodes.CompleteRelease,
            npb.CompleteReleaseRequest(node=name, reservation_id=reserved.reservation_id, fencing_token=9),
        ),
        (
            api.nodes.AbortRelease,
            npb.AbortReleaseRequest(node=name, reservation_id=reserved.reservation_id, fencing_token=9),
        ),
        (api.nodes.RemoveAddresses, npb.RemoveAddressesRequest(node=name, ips=[held.ipv4.ip], fencing_token=9)),
    ]
    before = _state(api, name)
    for call, request in stale:
        expect_error(call, request, grpc.StatusCode.FAILED_PRECONDITION, "STALE_FENCING_TOKEN")
    assert _state(api, name) == before

    # The holder's own token, and no token (a worker of a release before fencing), are taken.
    api.nodes.CompleteRelease(
        npb.CompleteReleaseRequest(node=name, reservation_id=reserved.reservation_id, fencing_token=10), timeout=5
    )
    api.nodes.AddAddresses(npb.AddAddressesRequest(node=name, interface=eni, ips=["10.20.0.50"]), timeout=5)
    # A newer token raises the node's newest: the former holder's 10 is refused from then on.
    api.nodes.SetInterfaces(npb.SetInterfacesRequest(node=name, interfaces=[eni], fencing_token=11), timeout=5)
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=name, count=1, fencing_token=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        "STALE_FENCING_TOKEN",
    )
    assert [i.id for i in api.nodes.GetNode(npb.GetNodeRequest(name=name), timeout=5).interfaces] == ["eni-x"]


def test_a_token_past_2_to_the_53_is_refused(api: Api) -> None:
    name = api.node_with_pool(1)
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=name, count=1, fencing_token=2**53 + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FENCING_TOKEN",
    )
    assert api.stats(name).reserved_ips == 0
