"""The worker's `AllocatorClient` over gRPC: the one place the worker's values become the
allocator's protobuf messages and back. Every change of a node carries the fencing token of the
node lock held by the maintenance making it (`fencing.current_token`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from clients.client import AsyncIpamClient, IpamClientError
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks
from services.core.reasons import ErrorReason

from .allocator_client import CLOUD_POOL, AllocatorError, NodeConfig, PoolAddresses, PoolNode, PoolStats, Reservation
from .fencing import current_token
from .model import InstanceLimits, NetworkInterface

# A prefix's release refused with nothing reserved: it stays, and the worker asks again later.
_PREFIX_KEPT = frozenset({ErrorReason.PREFIX_IN_USE, ErrorReason.PREFIX_COOLING_DOWN, ErrorReason.PREFIX_NOT_IN_POOL})


P = ParamSpec("P")
T = TypeVar("T")


def _translated(
    call: Callable[Concatenate[GrpcAllocator, P], Awaitable[T]],
) -> Callable[Concatenate[GrpcAllocator, P], Awaitable[T]]:
    """The client's failure as the worker's `AllocatorError` (gRPC's status stays here)."""

    @functools.wraps(call)
    async def wrapped(self: GrpcAllocator, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(self, *args, **kwargs)
        except IpamClientError as exc:
            raise AllocatorError(exc.reason, f"{exc.code.name}: {exc.message}") from exc

    return wrapped


class GrpcAllocator:
    """`AllocatorClient` on an `AsyncIpamClient`, every call on the node's cloud pool."""

    def __init__(self, client: AsyncIpamClient) -> None:
        self.client = client

    @_translated
    async def get_node(self, name: str) -> PoolNode:
        return node_from_message(await self.client.get_node(name, CLOUD_POOL))

    @_translated
    async def list_nodes(self, *, order_by_watermark: bool = False) -> list[PoolNode]:
        return [node_from_message(n) for n in await self.client.list_nodes(order_by_watermark=order_by_watermark)]

    @_translated
    async def dump(self, node: str) -> PoolAddresses:
        reply = await self.client.dump(node, CLOUD_POOL)
        return PoolAddresses(
            allocated_ipv4=frozenset(reply.ipv4),
            allocated_ipv6=frozenset(reply.ipv6),
            free_ipv4=frozenset(reply.free_ipv4),
            free_ipv6=frozenset(reply.free_ipv6),
            prefixes=frozenset(p.prefix for p in reply.prefixes),
            ipv6_prefix=reply.ipv6_prefix,
        )

    @_translated
    async def add_addresses(
        self,
        node: str,
        interface: NetworkInterface,
        ips: Sequence[str],
        *,
        vpc_cidrs: Sequence[str] = (),
        limits: InstanceLimits | None = None,
        prefixes: Sequence[str] = (),
        ipv6_prefix: str = "",
    ) -> PoolNode:
        request = npb.AddAddressesRequest(
            node=node,
            pool=CLOUD_POOL,
            interface=interface_message(interface),
            ips=list(ips),
            ipv4_prefixes=list(prefixes),
            ipv6_prefix=ipv6_prefix,
            vpc_cidrs=list(vpc_cidrs),
            fencing_token=current_token.get(),
        )
        if limits is not None:
            request.max_interfaces, request.ipv4_per_interface = limits.max_interfaces, limits.ipv4_per_interface
        reply = await self.client.add_addresses(request)
        return node_from_message(reply.node)

    @_translated
    async def set_interfaces(
        self,
        node: str,
        interfaces: Sequence[NetworkInterface],
        *,
        vpc_cidrs: Sequence[str],
        limits: InstanceLimits,
        deficit_reason: str,
    ) -> None:
        await self.client.set_interfaces(
            npb.SetInterfacesRequest(
                node=node,
                interfaces=[interface_message(i) for i in interfaces],
                vpc_cidrs=list(vpc_cidrs),
                max_interfaces=limits.max_interfaces,
                ipv4_per_interface=limits.ipv4_per_interface,
                deficit_reason=deficit_reason,
                fencing_token=current_token.get(),
            )
        )

    @_translated
    async def set_node_error(self, node: str, error: str) -> None:
        await self.client.set_node_error(node, error)

    @_translated
    async def remove_addresses(
        self, node: str, ips: Sequence[str], *, prefixes: Sequence[str] = (), ipv6_prefix: str = ""
    ) -> list[str]:
        reply = await self.client.remove_addresses(
            npb.RemoveAddressesRequest(
                node=node,
                pool=CLOUD_POOL,
                ips=ips,
                ipv4_prefixes=prefixes,
                ipv6_prefix=ipv6_prefix,
                fencing_token=current_token.get(),
            )
        )
        return list(reply.newly_lost)

    @_translated
    async def reserve_for_release(
        self, node: str, interface_id: str, count: int, family: Family, *, prefix: str = ""
    ) -> Reservation:
        try:
            reply = await self.client.reserve_for_release(
                npb.ReserveForReleaseRequest(
                    node=node,
                    pool=CLOUD_POOL,
                    interface_id=interface_id,
                    count=count,
                    family=pb.FAMILY_IPV6 if family is Family.IPV6 else pb.FAMILY_IPV4,
                    fencing_token=current_token.get(),
                    prefix=prefix,
                )
            )
        except IpamClientError as exc:
            if prefix and exc.reason in _PREFIX_KEPT:
                return Reservation("")  # an address of it in use or cooling (or it is gone): nothing reserved
            raise
        return Reservation(reply.reservation_id, tuple(reply.ips))

    @_translated
    async def complete_release(self, node: str, reservation_id: str, ips: Sequence[str]) -> list[str]:
        reply = await self.client.complete_release(
            npb.CompleteReleaseRequest(
                node=node,
                pool=CLOUD_POOL,
                reservation_id=reservation_id,
                ips=list(ips),
                fencing_token=current_token.get(),
            )
        )
        return list(reply.released_ips)

    @_translated
    async def abort_release(self, node: str, reservation_id: str) -> None:
        await self.client.abort_release(
            npb.AbortReleaseRequest(
                node=node, pool=CLOUD_POOL, reservation_id=reservation_id, fencing_token=current_token.get()
            )
        )

    async def close(self) -> None:
        await self.client.close()


def interface_message(interface: NetworkInterface) -> npb.Interface:
    """The allocator's interface entry for an interface as the cloud holds it."""
    return npb.Interface(
        id=interface.id,
        mac=interface.mac,
        device_index=interface.device_index,
        subnet_id=interface.subnet_id,
        subnet_cidr=interface.subnet_cidr,
        gateway_ip=interface.gateway_ip,
        primary_ip=interface.primary_ip,
        addresses=[*interface.ipv4, *interface.ipv6],
        ipv4_prefixes=list(interface.ipv4_prefixes),
        security_group_ids=list(interface.security_group_ids),
        subnet_ipv6_cidr=interface.subnet_ipv6_cidr,
        gateway_ipv6=interface.gateway_ipv6,
    )


def interface_from_message(message: npb.Interface) -> NetworkInterface:
    """An entry of the allocator's interface table (its addresses split by family)."""
    return NetworkInterface(
        id=message.id,
        mac=message.mac,
        device_index=message.device_index,
        subnet_id=message.subnet_id,
        subnet_cidr=message.subnet_cidr,
        primary_ip=message.primary_ip,
        ipv4=tuple(a for a in message.addresses if ":" not in a),
        ipv6=tuple(a for a in message.addresses if ":" in a),
        ipv4_prefixes=tuple(message.ipv4_prefixes),
        security_group_ids=tuple(message.security_group_ids),
        subnet_ipv6_cidr=message.subnet_ipv6_cidr,
        gateway_ipv6=message.gateway_ipv6,
    )


def node_from_message(node: npb.Node) -> PoolNode:
    """The worker's view of a node message."""
    spec, stats = node.spec, node.stats
    return PoolNode(
        config=NodeConfig(
            name=spec.name,
            instance_id=spec.instance_id,
            instance_type=spec.instance_type,
            watermarks=Watermarks(spec.pre_allocate, spec.min_allocate, spec.max_allocate, spec.max_above_watermark),
            first_interface_index=spec.first_interface_index,
            subnet_ids=tuple(spec.subnet_ids),
            subnet_tags=dict(spec.subnet_tags),
            security_group_ids=tuple(spec.security_group_ids),
            security_group_tags=dict(spec.security_group_tags),
            vpc_id=spec.vpc_id,
            availability_zone=spec.availability_zone,
            release_excess=spec.release_excess,
            ipv6_enabled=spec.ipv6_enabled,
            prefix_delegation=spec.prefix_delegation if spec.HasField("prefix_delegation") else None,
        ),
        stats=PoolStats(
            ipv4=PoolCounts(stats.available_ips, stats.used_ips, stats.cooling_ips),
            needed_ipv4=int(stats.needed_ips),
            excess_ipv4=int(stats.excess_ips),
            waiting_ipv4=int(stats.waiting_ipv4),
            ipv6=PoolCounts(stats.available_ipv6, stats.used_ipv6),
            needed_ipv6=int(stats.needed_ipv6),
            excess_ipv6=int(stats.excess_ipv6),
            waiting_ipv6=int(stats.waiting_ipv6),
            deficit_reason=stats.deficit_reason,
            remaining_interfaces=int(stats.remaining_interfaces),
            interface_candidates=int(stats.interface_candidates),
            empty_interface_slots=int(stats.empty_interface_slots),
        ),
        interfaces=_interfaces(node.interfaces),
        limits=InstanceLimits(node.max_interfaces, node.ipv4_per_interface),
        vpc_cidrs=tuple(node.vpc_cidrs),
        reservations=tuple(Reservation(r.id, tuple(r.ips), int(r.age_ms)) for r in node.reservations),
        last_error=node.last_error,
    )


def _interfaces(messages: Iterable[npb.Interface]) -> tuple[NetworkInterface, ...]:
    return tuple(interface_from_message(m) for m in messages)
