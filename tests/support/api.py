"""Thin test helpers over the generated stubs: channels with a role's token, status reasons."""

from __future__ import annotations

import ipaddress
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import allocator_pb2_grpc, nodes_pb2_grpc
from ipam.v1 import nodes_pb2 as npb

from .allocator_process import ADMIN_TOKEN, CLIENT_TOKEN


def expect_error(call, request, code: grpc.StatusCode, reason: str) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    """Makes the call (5 s deadline); asserts it fails with `code` and ErrorInfo `reason`."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    assert info.value.code() == code, info.value.details()
    assert reason_of(info.value) == reason
    return info.value


def reason_of(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" when there is none)."""
    status = rpc_status.from_call(error)
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request)


def channel(address: str, token: str | None) -> grpc.Channel:
    plain = grpc.insecure_channel(address)
    return plain if token is None else grpc.intercept_channel(plain, _BearerToken(token))


class Api:
    """Stubs for the three kinds of caller: admin, client, and anonymous."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channels = [channel(address, ADMIN_TOKEN), channel(address, CLIENT_TOKEN), channel(address, None)]
        admin, client, anonymous = self._channels
        self.nodes = nodes_pb2_grpc.NodeManagerStub(admin)
        self.admin_alloc = allocator_pb2_grpc.AllocatorStub(admin)
        self.alloc = allocator_pb2_grpc.AllocatorStub(client)
        self.client_nodes = nodes_pb2_grpc.NodeManagerStub(client)
        self.anon_alloc = allocator_pb2_grpc.AllocatorStub(anonymous)
        self.anon_nodes = nodes_pb2_grpc.NodeManagerStub(anonymous)

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def create_node(self, name: str | None = None, **spec: object) -> str:
        name = name or f"node-{uuid.uuid4().hex[:10]}"
        spec.setdefault("instance_type", "m5.large")
        self.nodes.CreateNode(npb.CreateNodeRequest(spec=npb.NodeSpec(name=name, **spec)), timeout=5)
        return name

    def seed(
        self,
        node: str,
        v4: int = 0,
        v6: int = 0,
        pool: str = "",
        *,
        base: str = "10.20.0.0",
        interface_id: str = "eni-test0",
    ) -> list[str]:
        """Adds addresses to a pool as the worker would (AddAddresses, admin)."""
        start4 = ipaddress.ip_address(base)
        ips = [str(start4 + 10 + i) for i in range(v4)]
        ips += [str(ipaddress.ip_address("2001:db8::") + 0x100 + i) for i in range(v6)]
        interface = npb.Interface(
            id=interface_id,
            mac="02:42:ac:11:00:02",
            device_index=0,
            subnet_id="subnet-test",
            subnet_cidr=f"{base}/16",
            gateway_ip=str(start4 + 1),
        )
        vpc_cidrs = ["10.20.0.0/16"] + ([f"{base}/16"] if not base.startswith("10.20.") else [])
        reply = self.nodes.AddAddresses(
            npb.AddAddressesRequest(node=node, pool=pool, interface=interface, ips=ips, vpc_cidrs=vpc_cidrs),
            timeout=5,
        )
        return list(reply.added_ips)

    def node_with_pool(self, v4: int = 16, v6: int = 0, **spec: object) -> str:
        if v6:
            spec.setdefault("ipv6_enabled", True)
        node = self.create_node(**spec)
        self.seed(node, v4, v6)
        return node

    def dump(self, node: str, pool: str = "") -> tuple[dict[str, str], dict[str, str]]:
        reply = self.admin_alloc.Dump(pb.DumpRequest(node=node, pool=pool), timeout=5)
        return dict(reply.ipv4), dict(reply.ipv6)

    def stats(self, node: str) -> npb.NodeStats:
        return self.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).stats
