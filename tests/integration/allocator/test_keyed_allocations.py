"""ReleaseByKey and ListAllocations (what a CNI plugin's DEL, CHECK and GC use), and the subnet an
allocation result carries."""

from __future__ import annotations

import grpc

from ipam.v1 import allocator_pb2 as pb
from tests.support.api import Api, expect_error


def _allocate(api: Api, node: str, owner: str, key: str, family: int = pb.FAMILY_IPV4) -> pb.AllocateNextResponse:
    request = pb.AllocateNextRequest(node=node, family=family, owner=owner, idempotency_key=key)
    return api.alloc.AllocateNext(request, timeout=5)


def _listed(api: Api, node: str, prefix: str = "") -> list[tuple[str, int, str, str]]:
    reply = api.alloc.ListAllocations(pb.ListAllocationsRequest(node=node, key_prefix=prefix), timeout=5)
    return [(a.ip, a.family, a.owner, a.idempotency_key) for a in reply.allocations]


def test_allocation_result_carries_the_subnet_of_its_interface(api: Api) -> None:
    node = api.node_with_pool(2)
    assert _allocate(api, node, "pod-a", "").ipv4.subnet_cidr == "10.20.0.0/16"


def test_release_by_key_releases_only_that_key_and_again_releases_nothing(api: Api) -> None:
    node = api.node_with_pool(4, 4)
    both = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, owner="c1", idempotency_key="net/c1/eth0"), timeout=5
    )
    other = _allocate(api, node, "c1", "net/c1/eth1").ipv4.ip

    reply = api.alloc.ReleaseByKey(pb.ReleaseByKeyRequest(node=node, idempotency_key="net/c1/eth0"), timeout=5)
    assert sorted(reply.released_ips) == sorted([both.ipv4.ip, both.ipv6.ip])
    v4, v6 = api.dump(node)
    assert (v4, v6) == ({other: "c1"}, {})
    again = api.alloc.ReleaseByKey(pb.ReleaseByKeyRequest(node=node, idempotency_key="net/c1/eth0"), timeout=5)
    assert list(again.released_ips) == []
    # The key is free again: a new AllocateNext under it allocates instead of replaying a released address.
    assert _allocate(api, node, "c1", "net/c1/eth0").ipv4.ip in api.dump(node)[0]


def test_release_by_key_refuses_bad_input_and_changes_nothing(api: Api) -> None:
    node = api.node_with_pool(2)
    ip = _allocate(api, node, "c1", "k1").ipv4.ip
    expect_error(
        api.alloc.ReleaseByKey,
        pb.ReleaseByKeyRequest(node=node),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IDEMPOTENCY_KEY_REQUIRED",
    )
    expect_error(
        api.alloc.ReleaseByKey,
        pb.ReleaseByKeyRequest(node=node, idempotency_key="k1\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TEXT",
    )
    expect_error(
        api.alloc.ReleaseByKey,
        pb.ReleaseByKeyRequest(node="no-such-node", idempotency_key="k1"),
        grpc.StatusCode.NOT_FOUND,
        "NODE_NOT_FOUND",
    )
    expect_error(
        api.alloc.ReleaseByKey,
        pb.ReleaseByKeyRequest(node=node, pool="other", idempotency_key="k1"),
        grpc.StatusCode.NOT_FOUND,
        "POOL_NOT_FOUND",
    )
    assert api.dump(node)[0] == {ip: "c1"}
    expect_error(
        api.anon_alloc.ReleaseByKey,
        pb.ReleaseByKeyRequest(node=node, idempotency_key="k1"),
        grpc.StatusCode.UNAUTHENTICATED,
        "MISSING_CREDENTIALS",
    )


def test_list_allocations_gives_owner_and_key_filtered_by_prefix(api: Api) -> None:
    node = api.node_with_pool(4, 2)
    a = _allocate(api, node, "c1", "cni:net-a/c1/eth0").ipv4.ip
    b = _allocate(api, node, "c2", "cni:net-a/c2/eth0", pb.FAMILY_IPV6).ipv6.ip
    c = _allocate(api, node, "c3", "cni:net-b/c3/eth0").ipv4.ip
    d = _allocate(api, node, "c4", "").ipv4.ip

    everything = _listed(api, node)
    assert sorted(everything) == sorted(
        [
            (a, pb.FAMILY_IPV4, "c1", "cni:net-a/c1/eth0"),
            (b, pb.FAMILY_IPV6, "c2", "cni:net-a/c2/eth0"),
            (c, pb.FAMILY_IPV4, "c3", "cni:net-b/c3/eth0"),
            (d, pb.FAMILY_IPV4, "c4", ""),
        ]
    )
    assert sorted(_listed(api, node, "cni:net-a/")) == sorted(
        [(a, pb.FAMILY_IPV4, "c1", "cni:net-a/c1/eth0"), (b, pb.FAMILY_IPV6, "c2", "cni:net-a/c2/eth0")]
    )
    assert _listed(api, node, "cni:net-c/") == []


def test_list_allocations_of_an_unknown_node_or_pool_is_not_found(api: Api) -> None:
    node = api.node_with_pool(1)
    expect_error(
        api.alloc.ListAllocations,
        pb.ListAllocationsRequest(node="no-such-node"),
        grpc.StatusCode.NOT_FOUND,
        "NODE_NOT_FOUND",
    )
    expect_error(
        api.alloc.ListAllocations,
        pb.ListAllocationsRequest(node=node, pool="other"),
        grpc.StatusCode.NOT_FOUND,
        "POOL_NOT_FOUND",
    )
    expect_error(
        api.alloc.ListAllocations,
        pb.ListAllocationsRequest(node=node, key_prefix="\t"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TEXT",
    )
