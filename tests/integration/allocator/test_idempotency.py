"""Idempotency keys: a retry gets the first try's result; a key belongs to its owner, family and
address until they are released, and any other use of it is refused and changes nothing."""

from __future__ import annotations

import grpc

from ipam.v1 import allocator_pb2 as pb
from services.core.reasons import ErrorReason
from tests.support.api import Api, expect_error


def _next(node: str, owner: str, key: str, family: int = pb.FAMILY_IPV4) -> pb.AllocateNextRequest:
    return pb.AllocateNextRequest(node=node, owner=owner, family=family, idempotency_key=key)


def test_allocate_next_with_a_key_another_owner_holds_is_refused_and_changes_nothing(api: Api) -> None:
    node = api.node_with_pool(v4=4, pre_allocate=0)
    first = api.alloc.AllocateNext(_next(node, "owner-a", "key-1"), timeout=5)
    before = api.dump(node)
    error = expect_error(
        api.alloc.AllocateNext,
        _next(node, "owner-b", "key-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        ErrorReason.IDEMPOTENCY_KEY_IN_USE,
    )
    assert first.ipv4.ip not in (error.details() or "")  # another owner's address is not shown
    assert api.dump(node) == before == ({first.ipv4.ip: "owner-a"}, {})


def test_allocate_next_with_a_key_used_for_another_family_is_refused(api: Api) -> None:
    node = api.node_with_pool(v4=2, v6=2, pre_allocate=0)
    api.alloc.AllocateNext(_next(node, "owner-a", "key-f"), timeout=5)
    expect_error(
        api.alloc.AllocateNext,
        _next(node, "owner-a", "key-f", pb.FAMILY_IPV6),
        grpc.StatusCode.FAILED_PRECONDITION,
        ErrorReason.IDEMPOTENCY_KEY_IN_USE,
    )
    assert api.dump(node)[1] == {}


def test_a_released_key_is_free_again(api: Api) -> None:
    node = api.node_with_pool(v4=2, pre_allocate=0)
    ip = api.alloc.AllocateNext(_next(node, "owner-a", "key-r"), timeout=5).ipv4.ip
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)
    again = api.alloc.AllocateNext(_next(node, "owner-b", "key-r"), timeout=5)
    assert again.ipv4.owner == "owner-b"


def test_allocate_with_a_key_returns_the_first_result_to_a_retry(api: Api) -> None:
    node = api.create_node(pre_allocate=0)
    first_ip, other_ip = api.seed(node, v4=2)
    request = pb.AllocateRequest(node=node, ip=first_ip, owner="owner-a", idempotency_key="key-s")
    first = api.alloc.Allocate(request, timeout=5).result
    retry = api.alloc.Allocate(request, timeout=5).result
    assert (retry.ip, retry.owner, retry.interface_id) == (first.ip, "owner-a", first.interface_id)
    # Without the key, the same request is a second allocation of a taken address.
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip=first_ip, owner="owner-a"),
        grpc.StatusCode.ALREADY_EXISTS,
        ErrorReason.IP_ALREADY_ALLOCATED,
    )
    for other in (
        pb.AllocateRequest(node=node, ip=other_ip, owner="owner-a", idempotency_key="key-s"),
        pb.AllocateRequest(node=node, ip=first_ip, owner="owner-b", idempotency_key="key-s"),
    ):
        expect_error(api.alloc.Allocate, other, grpc.StatusCode.FAILED_PRECONDITION, ErrorReason.IDEMPOTENCY_KEY_IN_USE)
    assert api.dump(node)[0] == {first_ip: "owner-a"}


def test_a_key_taken_by_allocate_is_released_by_key(api: Api) -> None:
    node = api.create_node(pre_allocate=0)
    ip = api.seed(node, v4=1)[0]
    api.alloc.Allocate(pb.AllocateRequest(node=node, ip=ip, owner="pod", idempotency_key="net/c1/eth0"), timeout=5)
    released = api.alloc.ReleaseByKey(pb.ReleaseByKeyRequest(node=node, idempotency_key="net/c1/eth0"), timeout=5)
    assert list(released.released_ips) == [ip]
    assert api.dump(node)[0] == {}
