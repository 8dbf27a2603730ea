"""What the allocator knows of a node and its pools, as plain values (no I/O): the store answers
with them, the service decides with them, the servicer turns them into messages."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import IntEnum

from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks

from .errors import ResourceExhausted
from .model import Allocation


def family_of(ip: str) -> Family:
    """The family of an address the store holds (already normalised when it entered)."""
    return Family.IPV4 if ipaddress.ip_address(ip).version == 4 else Family.IPV6


@dataclass(frozen=True, slots=True)
class NodeInterface:
    """One network interface of a node as the worker reported it (fields as `ipam.v1.Interface`)."""

    id: str = ""
    mac: str = ""
    device_index: int = 0
    subnet_id: str = ""
    subnet_cidr: str = ""  # IPv4
    gateway_ip: str = ""  # IPv4
    addresses: tuple[str, ...] = ()  # secondary addresses attached, both families
    primary_ip: str = ""
    security_group_ids: tuple[str, ...] = ()
    subnet_ipv6_cidr: str = ""
    gateway_ipv6: str = ""
    ipv4_prefixes: tuple[str, ...] = ()  # IPv4 /28 prefixes delegated to it

    def address_count(self, family: Family) -> int:
        """How many of its secondary addresses are of `family`."""
        return sum(1 for a in self.addresses if family_of(a) is family)

    def ipv4_slots_used(self) -> int:
        """Its IPv4 address slots taken beside the primary: one per secondary address, one per prefix."""
        return self.address_count(Family.IPV4) + len(self.ipv4_prefixes)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """The parts of a node's spec the allocator itself uses."""

    watermarks: Watermarks
    first_interface_index: int
    release_excess: bool
    ipv6_enabled: bool
    # The spec's lists and maps by name (a map's entries as key=value), only to bound their sizes.
    spec_items: Mapping[str, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CloudFacts:
    """What the worker reports of a node's cloud along with its addresses or interfaces: the VPC's
    CIDRs and the instance's limits (empty or 0: unknown, what the node holds is kept)."""

    vpc_cidrs: tuple[str, ...] = ()
    max_interfaces: int = 0
    ipv4_per_interface: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
    """Addresses reserved for release by the worker, and when (ms since the epoch)."""

    id: str
    ips: tuple[str, ...]
    created_ms: int
    prefix: str = ""  # the IPv4 /28 reserved whole ("" = single addresses)


@dataclass(frozen=True, slots=True)
class PoolState:
    """A pool's counts per family and its node's sizing, as a script left them."""

    counts: dict[Family, PoolCounts]
    watermarks: Watermarks
    release_excess: bool
    ipv6_enabled: bool
    event_pending: bool
    waiting_ipv4: int = 0  # callers waiting for an IPv4 refill
    waiting_ipv6: int = 0  # callers waiting for an IPv6 refill
    lost_ips: int = 0  # allocated addresses the cloud no longer holds
    reserved: int = 0  # reserved for release by the worker (both families)
    excluded: int = 0  # never handed out (both families)
    deficit_reason: str = ""  # why the worker could not meet the last deficit
    prefixes: int = 0  # IPv4 /28 prefixes the pool holds
    stranded: int = 0  # free addresses of prefixes with an address in use (none of those can be given back)
    ipv6_prefix: bool = False  # the pool holds an IPv6 /80: it never needs an IPv6 refill


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What the allocator keeps about a node, apart from its pools' addresses."""

    name: str
    spec: bytes
    interfaces: list[NodeInterface]
    pools: list[str]
    vpc_cidrs: list[str]
    max_interfaces: int
    ipv4_per_interface: int
    deficit_reason: str
    created_ms: int
    first_interface_index: int
    reservations: list[Reservation] = field(default_factory=list)  # of the pool asked for
    prefixes: tuple[PrefixUse, ...] = ()  # of the pool asked for
    ipv6_prefix: str = ""  # the /80 of the pool asked for ("" = none)
    last_error: str = ""  # the worker's last error maintaining the node
    last_error_ms: int = 0


@dataclass(slots=True)
class AllocateOutcome:
    """What an allocation did: the addresses, the pool after it (None when it provably needs no
    event: the store reads the whole state only near a watermark), and whether it only replayed an
    earlier call with the same idempotency key (then it changed nothing)."""

    allocations: list[Allocation]
    state: PoolState | None
    replayed: bool = False


@dataclass(slots=True)
class ChangeOutcome:
    """Result of a mutating script: the addresses it touched and the pool state after it (None when
    it provably needs no event)."""

    state: PoolState | None
    ips: list[str] = field(default_factory=list)
    other_ips: list[str] = field(default_factory=list)
    reservation_id: str = ""  # of reserve_for_release ("" when nothing was reserved)
    next_ms: int = 0


@dataclass(frozen=True, slots=True)
class RemoveOutcome:
    """What dropping addresses the cloud no longer holds did."""

    removed: list[str]  # left the pool
    still_allocated: list[str]  # allocated, so kept for their owners (and marked lost)
    newly_lost: list[str]  # of those, the ones not marked lost before
    removed_prefixes: list[str] = field(default_factory=list)  # prefixes that left the pool


@dataclass(frozen=True, slots=True)
class KeyedAllocation:
    """One allocated address with its owner and the idempotency key it was taken under."""

    ip: str
    family: Family
    owner: str
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class PoolSubnet:
    """A subnet of one family holding addresses of a pool, its gateway, and the interfaces in it."""

    family: Family
    cidr: str
    gateway_ip: str
    interface_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PrefixUse:
    """One IPv4 /28 prefix of a pool and how its 16 addresses are used."""

    prefix: str
    interface_id: str
    free: int = 0  # free and out of the reuse cooldown
    cooling: int = 0  # free, still in the reuse cooldown
    allocated: int = 0
    excluded: int = 0
    reserved: int = 0  # reserved for release


def prefix_uses(
    prefixes: Mapping[str, str],
    free: Mapping[str, float],
    allocated: Set[str],
    excluded: Set[str],
    reserved: Set[str],
    cooled_by_ms: float,
) -> tuple[PrefixUse, ...]:
    """Each prefix (prefix -> interface id) with its addresses counted by state, lowest prefix first:
    `free` maps free addresses to the ms they became free; those freed after `cooled_by_ms` are cooling."""
    out = []
    for prefix in sorted(prefixes, key=lambda p: ipaddress.ip_network(p)):
        counts = dict.fromkeys(("free", "cooling", "allocated", "excluded", "reserved"), 0)
        for address in ipaddress.ip_network(prefix):
            ip = str(address)
            if ip in free:
                counts["cooling" if free[ip] > cooled_by_ms else "free"] += 1
            elif ip in allocated:
                counts["allocated"] += 1
            elif ip in reserved:
                counts["reserved"] += 1
            elif ip in excluded:
                counts["excluded"] += 1
        out.append(PrefixUse(prefix, prefixes[prefix], **counts))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PoolDump:
    """A pool's allocations (ip -> owner, excluded ones as "<owner> (excluded)"), free addresses and
    subnets, per family."""

    ipv4: dict[str, str]
    ipv6: dict[str, str]
    free_ipv4: list[str]
    free_ipv6: list[str]
    subnets: tuple[PoolSubnet, ...] = ()
    prefixes: tuple[PrefixUse, ...] = ()
    ipv6_prefix: str = ""


class EventKind(IntEnum):
    """Why a pool event was published; values match `ipam.v1.PoolEvent.Kind`."""

    UNSPECIFIED = 0  # only in events of a newer or older allocator
    DEFICIT = 1
    EXCESS = 2


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """ "Look at this node's pool": what the allocator publishes for the worker."""

    node: str
    pool: str
    kind: EventKind
    published_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Replication:
    """The store's masters and replicas as the allocator sees them (see `RedisStatus` in the API)."""

    mode: str
    master: str
    masters: int
    replicas: int
    replicas_in_sync: int
    min_replicas: int


class PoolEmpty(ResourceExhausted):
    """The pool has no free address of `family`; `state` is the pool as the script left it, so the
    caller can decide on an event or a wait without reading it again."""

    def __init__(self, message: str, *, reason: str, family: Family, state: PoolState, **metadata: str) -> None:
        super().__init__(message, reason=reason, **metadata)
        self.family = family
        self.state = state
