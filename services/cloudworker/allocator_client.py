"""What the worker asks of the allocator, in the worker's own values: the calls the node maintainer
and the periodic jobs make. `allocator_grpc.GrpcAllocator` implements them over gRPC (the one
place protobuf is translated); unit tests put a fake behind the same Protocol."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks
from services.core.reasons import ErrorReason

from .model import InstanceLimits, NetworkInterface

CLOUD_POOL = "default"  # the pool the cloud fills (ENI mode has one pool per node)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's spec as the allocator holds it."""

    name: str
    instance_id: str = ""
    instance_type: str = ""
    watermarks: Watermarks = field(default_factory=Watermarks)
    first_interface_index: int = 0
    subnet_ids: tuple[str, ...] = ()
    subnet_tags: Mapping[str, str] = field(default_factory=dict)
    security_group_ids: tuple[str, ...] = ()
    security_group_tags: Mapping[str, str] = field(default_factory=dict)
    vpc_id: str = ""
    availability_zone: str = ""
    release_excess: bool = False
    ipv6_enabled: bool = False
    prefix_delegation: bool | None = None  # None: the worker's default


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The cloud pool's statistics as the allocator computes them."""

    ipv4: PoolCounts = field(default_factory=lambda: PoolCounts(0, 0))
    needed_ipv4: int = 0
    excess_ipv4: int = 0
    waiting_ipv4: int = 0  # callers waiting for a refill
    ipv6: PoolCounts = field(default_factory=lambda: PoolCounts(0, 0))
    needed_ipv6: int = 0
    excess_ipv6: int = 0
    waiting_ipv6: int = 0
    deficit_reason: str = ""
    remaining_interfaces: int = 0
    interface_candidates: int = 0
    empty_interface_slots: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    """Addresses reserved for release (step one of the handshake), and how long ago."""

    id: str
    ips: tuple[str, ...] = ()
    age_ms: int = 0


@dataclass(frozen=True, slots=True)
class PoolNode:
    """A node as the allocator holds it: its spec, its cloud pool, and what the worker last told it."""

    config: NodeConfig
    stats: PoolStats = field(default_factory=PoolStats)
    interfaces: tuple[NetworkInterface, ...] = ()  # the allocator's interface table
    limits: InstanceLimits = field(default_factory=lambda: InstanceLimits(0, 0))  # as last reported
    vpc_cidrs: tuple[str, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    last_error: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def reserved(self) -> set[str]:
        """Every address reserved for release."""
        return {ip for r in self.reservations for ip in r.ips}


@dataclass(frozen=True, slots=True)
class PoolAddresses:
    """The cloud pool's addresses (its Dump): those allocated and those free, by family."""

    allocated_ipv4: frozenset[str] = frozenset()
    allocated_ipv6: frozenset[str] = frozenset()
    free_ipv4: frozenset[str] = frozenset()
    free_ipv6: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()  # IPv4 /28 prefixes (their addresses are in the sets above)
    ipv6_prefix: str = ""  # the IPv6 /80 ("" = none); only its addresses handed out are in the sets above

    def listed_by_cloud(self, reserved: Collection[str]) -> set[str]:
        """The addresses the cloud lists for the pool: those it holds and `reserved`, less the
        addresses of its IPv6 /80 (the cloud lists the prefix, never its addresses)."""
        addresses = self.held | frozenset(reserved)
        if not self.ipv6_prefix:
            return set(addresses)
        prefix = ipaddress.ip_network(self.ipv6_prefix)
        return {ip for ip in addresses if ":" not in ip or ipaddress.ip_address(ip) not in prefix}

    @property
    def held(self) -> frozenset[str]:
        """Every address the pool holds, allocated or free (reserved ones excluded)."""
        return self.allocated_ipv4 | self.allocated_ipv6 | self.free_ipv4 | self.free_ipv6


class AllocatorError(Exception):
    """The allocator refused a call or could not be reached: its stable reason ("" when it gave
    none; a reason this release does not know stays a plain string) and what it said."""

    def __init__(self, reason: ErrorReason | str, message: str) -> None:
        super().__init__(f"{reason or 'no reason'}: {message}")
        self.reason = reason
        self.message = message


class AllocatorClient(Protocol):
    """The allocator's node and pool calls the worker makes, on each node's cloud pool; each raises
    `AllocatorError` when the call fails."""

    async def get_node(self, name: str) -> PoolNode: ...

    async def list_nodes(self, *, order_by_watermark: bool = False) -> list[PoolNode]: ...

    async def dump(self, node: str) -> PoolAddresses: ...

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
        """Addresses attached in the cloud join the pool, `prefixes` (IPv4 /28) with their 16
        addresses each, and `ipv6_prefix` (an IPv6 /80, handed out lazily); returns the node afterwards."""
        ...

    async def set_interfaces(
        self,
        node: str,
        interfaces: Sequence[NetworkInterface],
        *,
        vpc_cidrs: Sequence[str],
        limits: InstanceLimits,
        deficit_reason: str,
    ) -> None: ...

    async def set_node_error(self, node: str, error: str) -> None: ...

    async def remove_addresses(
        self, node: str, ips: Sequence[str], *, prefixes: Sequence[str] = (), ipv6_prefix: str = ""
    ) -> list[str]:
        """Addresses and prefixes (IPv4 /28s, the IPv6 /80) gone from the cloud leave the pool
        (allocated addresses are marked lost); returns those newly marked lost."""
        ...

    async def reserve_for_release(
        self, node: str, interface_id: str, count: int, family: Family, *, prefix: str = ""
    ) -> Reservation:
        """Reserves up to `count` free addresses of the interface, or with `prefix` that IPv4 /28
        whole (all 16 free and out of the cooldown, else nothing: an empty reservation)."""
        ...

    async def complete_release(self, node: str, reservation_id: str, ips: Sequence[str]) -> list[str]:
        """The reserved `ips` were unassigned: they leave the pool; returns those released."""
        ...

    async def abort_release(self, node: str, reservation_id: str) -> None: ...

    async def close(self) -> None: ...
