"""Bad input and missing credentials are refused with a stable reason and change nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from tests.support.api import Api, reason_of

LONG = "x" * 300
INVALID, NOT_FOUND, FAILED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)

# (case id, stub attribute on Api, method, request factory given the node name, code, reason)
CASES: list[tuple[str, str, str, Callable[[str], Any], grpc.StatusCode, str]] = [
    (
        "malformed ip",
        "alloc",
        "Allocate",
        lambda n: pb.AllocateRequest(node=n, ip="10.20.0.999", owner="o"),
        INVALID,
        "INVALID_IP",
    ),
    (
        "cidr as ip",
        "alloc",
        "Allocate",
        lambda n: pb.AllocateRequest(node=n, ip="10.20.0.0/24", owner="o"),
        INVALID,
        "INVALID_IP",
    ),
    (
        "ipv6 zone id",
        "alloc",
        "Allocate",
        lambda n: pb.AllocateRequest(node=n, ip="fe80::1%eth0", owner="o"),
        INVALID,
        "INVALID_IP",
    ),
    (
        "release with a zone id",
        "alloc",
        "Release",
        lambda n: pb.ReleaseRequest(node=n, ip="2001:db8::5%eth0"),
        INVALID,
        "INVALID_IP",
    ),
    (
        "exclude with a zone id",
        "alloc",
        "ExcludeIP",
        lambda n: pb.ExcludeIPRequest(node=n, ip="2001:db8::5%eth0", owner="o"),
        INVALID,
        "INVALID_IP",
    ),
    (
        "timer with a zone id",
        "alloc",
        "StartExpirationTimer",
        lambda n: pb.StartExpirationTimerRequest(node=n, ip="fe80::1%eth0", timeout_seconds=5),
        INVALID,
        "INVALID_IP",
    ),
    (
        "empty owner",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner=""),
        INVALID,
        "OWNER_REQUIRED",
    ),
    (
        "oversized owner",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner=LONG),
        INVALID,
        "TEXT_TOO_LONG",
    ),
    (
        "owner with control characters",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner="a\tb"),
        INVALID,
        "INVALID_TEXT",
    ),
    (
        "oversized idempotency key",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner="o", idempotency_key=LONG),
        INVALID,
        "TEXT_TOO_LONG",
    ),
    (
        "oversized node",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node="n" * 300, owner="o"),
        INVALID,
        "NAME_TOO_LONG",
    ),
    (
        "node with a brace",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node="a}b", owner="o"),
        INVALID,
        "INVALID_NAME",
    ),
    (
        "empty node",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node="", owner="o"),
        INVALID,
        "NODE_REQUIRED",
    ),
    (
        "unknown family",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner="o", family=7),
        INVALID,
        "INVALID_FAMILY",
    ),
    (
        "expiration too long",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner="o", expiration_seconds=10**8),
        INVALID,
        "INVALID_TIMEOUT",
    ),
    (
        "unknown node",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node="nobody", owner="o"),
        NOT_FOUND,
        "NODE_NOT_FOUND",
    ),
    (
        "unknown pool",
        "alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, pool="nopool", owner="o"),
        NOT_FOUND,
        "POOL_NOT_FOUND",
    ),
    (
        "ip not in pool",
        "alloc",
        "Allocate",
        lambda n: pb.AllocateRequest(node=n, ip="10.99.0.1", owner="o"),
        FAILED,
        "IP_NOT_IN_POOL",
    ),
    (
        "release with neither ip nor owner",
        "alloc",
        "Release",
        lambda n: pb.ReleaseRequest(node=n),
        INVALID,
        "IP_OR_OWNER_REQUIRED",
    ),
    ("release malformed ip", "alloc", "Release", lambda n: pb.ReleaseRequest(node=n, ip="nope"), INVALID, "INVALID_IP"),
    (
        "release unknown ip",
        "alloc",
        "Release",
        lambda n: pb.ReleaseRequest(node=n, ip="10.20.0.13"),
        NOT_FOUND,
        "IP_NOT_ALLOCATED",
    ),
    (
        "exclude without owner",
        "alloc",
        "ExcludeIP",
        lambda n: pb.ExcludeIPRequest(node=n, ip="10.20.0.10"),
        INVALID,
        "OWNER_REQUIRED",
    ),
    (
        "exclude malformed ip",
        "alloc",
        "ExcludeIP",
        lambda n: pb.ExcludeIPRequest(node=n, ip="10.20.0", owner="o"),
        INVALID,
        "INVALID_IP",
    ),
    (
        "zero timer",
        "alloc",
        "StartExpirationTimer",
        lambda n: pb.StartExpirationTimerRequest(node=n, ip="10.20.0.10", timeout_seconds=0),
        INVALID,
        "INVALID_TIMEOUT",
    ),
    (
        "timer on a free address",
        "alloc",
        "StartExpirationTimer",
        lambda n: pb.StartExpirationTimerRequest(node=n, ip="10.20.0.13", timeout_seconds=5),
        NOT_FOUND,
        "IP_NOT_ALLOCATED",
    ),
    (
        "stop timer without uuid",
        "alloc",
        "StopExpirationTimer",
        lambda n: pb.StopExpirationTimerRequest(node=n, ip="10.20.0.10"),
        INVALID,
        "EXPIRATION_UUID_REQUIRED",
    ),
    (
        "negative pre_allocate",
        "nodes",
        "UpdateNode",
        lambda n: npb.UpdateNodeRequest(spec=npb.NodeSpec(name=n, pre_allocate=-1)),
        INVALID,
        "INVALID_SPEC",
    ),
    (
        "too many subnet ids",
        "nodes",
        "UpdateNode",
        lambda n: npb.UpdateNodeRequest(spec=npb.NodeSpec(name=n, subnet_ids=[f"subnet-{i}" for i in range(101)])),
        INVALID,
        "SPEC_TOO_LARGE",
    ),
    (
        "too many security group tags",
        "nodes",
        "UpdateNode",
        lambda n: npb.UpdateNodeRequest(
            spec=npb.NodeSpec(name=n, security_group_tags={f"k{i}": "v" for i in range(101)})
        ),
        INVALID,
        "SPEC_TOO_LARGE",
    ),
    (
        "oversized subnet tag",
        "nodes",
        "UpdateNode",
        lambda n: npb.UpdateNodeRequest(spec=npb.NodeSpec(name=n, subnet_tags={"k": "v" * 600})),
        INVALID,
        "SPEC_TOO_LARGE",
    ),
    (
        "page size too large",
        "nodes",
        "ListNodes",
        lambda n: npb.ListNodesRequest(page_size=100_000),
        INVALID,
        "INVALID_PAGE",
    ),
    (
        "page token not ours",
        "nodes",
        "ListNodes",
        lambda n: npb.ListNodesRequest(order_by_watermark=True, page_token="name:x"),
        INVALID,
        "INVALID_PAGE",
    ),
    (
        "node name with a space",
        "nodes",
        "CreateNode",
        lambda n: npb.CreateNodeRequest(spec=npb.NodeSpec(name="a b")),
        INVALID,
        "INVALID_NAME",
    ),
    (
        "add a malformed address",
        "nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["10.20.0.50", "bad"]),
        INVALID,
        "INVALID_IP",
    ),
    (
        "add an address with a zone id",
        "nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["2001:db8::5%eth0"]),
        INVALID,
        "INVALID_IP",
    ),
    (
        "add an address outside the VPC",
        "nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["10.20.0.50", "192.168.7.7"], vpc_cidrs=["10.20.0.0/16"]),
        INVALID,
        "IP_OUTSIDE_VPC",
    ),
    (
        "add an address outside the VPC the node has",
        "nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["172.31.0.9"]),
        INVALID,
        "IP_OUTSIDE_VPC",
    ),
    (
        "add with a malformed VPC CIDR",
        "nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["10.20.0.50"], vpc_cidrs=["10.20.0.0/33"]),
        INVALID,
        "INVALID_CIDR",
    ),
    (
        "missing token",
        "anon_alloc",
        "AllocateNext",
        lambda n: pb.AllocateNextRequest(node=n, owner="o"),
        grpc.StatusCode.UNAUTHENTICATED,
        "MISSING_CREDENTIALS",
    ),
    (
        "interface with an IPv4 block as its IPv6 subnet",
        "nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(
            node=n, ips=["10.20.0.50"], interface=npb.Interface(id="eni-x", subnet_ipv6_cidr="10.20.0.0/16")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WRONG_FAMILY",
    ),
    (
        "interface with an IPv4 IPv6 gateway",
        "nodes",
        "SetInterfaces",
        lambda n: npb.SetInterfacesRequest(
            node=n, interfaces=[npb.Interface(id="eni-x", subnet_ipv6_cidr="2001:db8::/64", gateway_ipv6="10.0.0.1")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WRONG_FAMILY",
    ),
    (
        "interface with a malformed subnet",
        "nodes",
        "SetInterfaces",
        lambda n: npb.SetInterfacesRequest(node=n, interfaces=[npb.Interface(id="eni-x", subnet_cidr="10.0.0.0/40")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CIDR",
    ),
    (
        "missing token on admin call",
        "anon_nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["10.20.0.50"]),
        grpc.StatusCode.UNAUTHENTICATED,
        "MISSING_CREDENTIALS",
    ),
    (
        "client token on admin call",
        "client_nodes",
        "AddAddresses",
        lambda n: npb.AddAddressesRequest(node=n, ips=["10.20.0.50"]),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    ),
    (
        "client token deletes a node",
        "client_nodes",
        "DeleteNode",
        lambda n: npb.DeleteNodeRequest(name=n),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    ),
]


def _snapshot(api: Api, node: str) -> tuple[Any, ...]:
    got = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    return api.dump(node), got.stats, got.spec


@pytest.mark.parametrize("stub,method,make,code,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_and_unchanged(
    api: Api, stub: str, method: str, make: Callable[[str], Any], code: grpc.StatusCode, reason: str
) -> None:
    node = api.node_with_pool(4, 1)
    api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="holder"), timeout=5)
    before = _snapshot(api, node)
    with pytest.raises(grpc.RpcError) as info:
        getattr(getattr(api, stub), method)(make(node), timeout=5)
    assert info.value.code() == code, info.value.details()
    assert reason_of(info.value) == reason
    assert _snapshot(api, node) == before


def test_wrong_token_is_unauthenticated(allocator) -> None:  # type: ignore[no-untyped-def]
    from ipam.v1 import allocator_pb2_grpc
    from tests.support.api import channel

    with channel(allocator.address, "not-a-token") as ch, pytest.raises(grpc.RpcError) as info:
        allocator_pb2_grpc.AllocatorStub(ch).Ping(pb.PingRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(info.value) == "INVALID_CREDENTIALS"


def test_admin_token_may_call_the_allocator_and_health_is_open(api: Api, allocator) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    api.admin_alloc.Ping(pb.PingRequest(), timeout=5)
    api.alloc.Ping(pb.PingRequest(), timeout=5)
    with grpc.insecure_channel(allocator.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="ipam.v1.Allocator"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", ["/ipam.v1.Allocator/AllocateNext", "/ipam.v1.NodeManager/AddAddresses"])
def test_undecodable_request_is_invalid_argument(api: Api, method: str) -> None:
    from tests.support.allocator_process import ADMIN_TOKEN

    node = api.node_with_pool(2)
    before = _snapshot(api, node)
    with grpc.insecure_channel(api.address) as ch:
        raw = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\x05ab", timeout=5, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert reason_of(info.value) == "MALFORMED_REQUEST"
    assert "DecodeError" not in (info.value.details() or "")
    assert _snapshot(api, node) == before
