"""The worker's planner: decide the one next step for a node's pool, without any I/O.

Given what the node wants (spec, watermarks), what its pool holds (counts), what the cloud holds
(interfaces, instance limits, subnets), `plan` returns one action: allocate on an existing
interface, create an interface, release excess, or nothing — with the reason. It follows Cilium's
`determineMaintenanceAction` and the ENI `PrepareIPAllocation` / `PrepareIPRelease` /
`findSuitableSubnet`. The worker runs the action, reads the truth back, and plans again.

`plan` covers IPv4, whose per-interface slots and subnet capacity shape every step. IPv6 addresses
only ride on the interfaces IPv4 brought: the maintainer assigns them where there is room, and
`plan_ipv6_release` picks where its excess is given back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.cloudworker.model import InstanceLimits, NetworkInterface, SecurityGroup, Subnet
from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks, pool_excess_ips, pool_needed_ips
from services.core.reasons import DeficitReason

__all__ = [
    "Action",
    "AllocationAction",
    "InterfaceState",
    "NoAction",
    "NodeSpec",
    "PoolCounts",
    "ReleaseAction",
    "Watermarks",
    "plan",
    "plan_ipv6_release",
]



@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What the planner needs of a node's spec (the proto `NodeSpec`, minus names and ids)."""

    watermarks: Watermarks = field(default_factory=Watermarks)
    first_interface_index: int = 0
    subnet_ids: tuple[str, ...] = ()
    subnet_tags: Mapping[str, str] = field(default_factory=dict)
    security_group_ids: tuple[str, ...] = ()
    vpc_id: str = ""  # "" = do not filter subnets by VPC
    availability_zone: str = ""  # "" = do not filter subnets by zone
    release_excess: bool = False


@dataclass(frozen=True, slots=True)
class InterfaceState:
    """One interface of the node, as far as planning goes."""

    id: str
    device_index: int
    subnet_id: str
    ipv4_addresses: int  # IPv4 addresses attached, the primary included
    free_ipv4: int = 0  # of those, how many the pool holds free (releasable)
    security_group_ids: tuple[str, ...] = ()
    free_ipv6: int = 0  # IPv6 addresses of the interface the pool holds free (releasable)

    @classmethod
    def from_cloud(cls, interface: NetworkInterface, free_ipv4: int = 0, free_ipv6: int = 0) -> InterfaceState:
        """The planning view of an interface read from the provider."""
        return cls(
            id=interface.id,
            device_index=interface.device_index,
            subnet_id=interface.subnet_id,
            ipv4_addresses=interface.ipv4_count,
            free_ipv4=free_ipv4,
            security_group_ids=interface.security_group_ids,
            free_ipv6=free_ipv6,
        )


@dataclass(frozen=True, slots=True)
class AllocationAction:
    """Add `count` secondary IPv4 addresses.

    With `interface_id` set: assign them on that existing interface. With `interface_id` empty:
    create an interface in `subnet_id` with `security_group_ids`, holding `count` secondaries,
    and attach it at `device_index`.
    """

    count: int
    subnet_id: str
    device_index: int
    interface_id: str = ""
    security_group_ids: tuple[str, ...] = ()

    @property
    def creates_interface(self) -> bool:
        """True when the action creates a new interface."""
        return not self.interface_id


@dataclass(frozen=True, slots=True)
class ReleaseAction:
    """Give `count` free addresses of `family` of interface `interface_id` back to the cloud."""

    interface_id: str
    subnet_id: str
    count: int
    family: Family = Family.IPV4


@dataclass(frozen=True, slots=True)
class NoAction:
    """Nothing to do now, and why; `detail` is for humans."""

    reason: DeficitReason
    detail: str = ""


Action = AllocationAction | ReleaseAction | NoAction


def plan(
    spec: NodeSpec,
    counts: PoolCounts,
    interfaces: Sequence[InterfaceState],
    limits: InstanceLimits,
    subnets: Sequence[Subnet],
    surge: int = 0,
) -> Action:
    """The one next step for the node's IPv4 pool.

    `surge` counts callers waiting for a refill (Cilium's pending pods): they are added to the
    deficit, so one step serves them and still leaves the watermark free.
    Release wins only when there is excess, no deficit, and `spec.release_excess` is set.
    `subnets` should hold the subnets of the node's VPC and zone; an existing interface whose
    subnet is missing from it is not used (its free addresses are unknown).
    """
    if limits.max_interfaces <= 0 or limits.ipv4_per_interface <= 0:
        raise ValueError(f"instance limits unknown or invalid: {limits}")
    w = spec.watermarks
    needed = pool_needed_ips(counts, w) + max(surge, 0)
    if needed > 0:
        return _plan_allocation(spec, counts, needed, interfaces, limits, subnets)

    excess = pool_excess_ips(counts, w)
    if excess > 0:
        if spec.release_excess:
            return _plan_release(spec, interfaces, excess)
        return NoAction(DeficitReason.NOTHING_NEEDED, f"{excess} in excess, release disabled")
    if w.max_allocate > 0 and pool_needed_ips(counts, replace(w, max_allocate=0)) > 0:
        return NoAction(DeficitReason.MAX_ALLOCATE, f"pool holds {counts.available} of max_allocate {w.max_allocate}")
    return NoAction(DeficitReason.NOTHING_NEEDED)


def _plan_allocation(
    spec: NodeSpec,
    counts: PoolCounts,
    needed: int,
    interfaces: Sequence[InterfaceState],
    limits: InstanceLimits,
    subnets: Sequence[Subnet],
) -> Action:
    w = spec.watermarks
    wanted = needed + w.max_above_watermark
    if w.max_allocate > 0:
        wanted = min(wanted, w.max_allocate - counts.available)
        if wanted <= 0:
            detail = f"pool holds {counts.available} of max_allocate {w.max_allocate}"
            return NoAction(DeficitReason.MAX_ALLOCATE, detail)

    # An existing interface with a free slot, in a subnet with free addresses, lowest device first.
    subnets_by_id = {s.id: s for s in subnets}
    blocked_by_subnet = False
    for interface in sorted(interfaces, key=lambda i: i.device_index):
        room = limits.ipv4_per_interface - interface.ipv4_addresses
        if interface.device_index < spec.first_interface_index or room <= 0:
            continue
        subnet = subnets_by_id.get(interface.subnet_id)
        if subnet is None:
            continue
        if subnet.free_addresses <= 0:
            blocked_by_subnet = True
            continue
        return AllocationAction(
            count=min(wanted, room, subnet.free_addresses),
            subnet_id=subnet.id,
            device_index=interface.device_index,
            interface_id=interface.id,
        )

    # Else a new interface at the lowest free device index.
    free_indexes = _free_device_indexes(spec, interfaces, limits)
    if not free_indexes:
        if blocked_by_subnet:
            return NoAction(DeficitReason.SUBNET_FULL, "interfaces with free slots are in full subnets")
        return NoAction(
            DeficitReason.AT_CAPACITY,
            f"{limits.capacity(spec.first_interface_index)} usable addresses, all attached",
        )
    subnet = _subnet_for_new_interface(spec, interfaces, limits, subnets)
    if subnet is None:
        return NoAction(DeficitReason.SUBNET_FULL, "no subnet the node may use has free addresses")
    return AllocationAction(
        # The new interface's primary address also comes out of the subnet.
        count=min(wanted, limits.ipv4_per_interface - 1, subnet.free_addresses - 1),
        subnet_id=subnet.id,
        device_index=free_indexes[0],
        security_group_ids=_security_groups(spec, interfaces),
    )


def plan_ipv6_release(spec: NodeSpec, counts: PoolCounts, interfaces: Sequence[InterfaceState]) -> Action:
    """The next step for the node's IPv6 excess: a release (with `spec.release_excess`) or nothing."""
    excess = pool_excess_ips(counts, spec.watermarks)
    if excess <= 0 or pool_needed_ips(counts, spec.watermarks) > 0:
        return NoAction(DeficitReason.NOTHING_NEEDED)
    if not spec.release_excess:
        return NoAction(DeficitReason.NOTHING_NEEDED, f"{excess} IPv6 in excess, release disabled")
    return _plan_release(spec, interfaces, excess, Family.IPV6)


def _plan_release(
    spec: NodeSpec, interfaces: Sequence[InterfaceState], excess: int, family: Family = Family.IPV4
) -> Action:
    """Release from the interface with the most free addresses (ties: lowest device index)."""

    def free(interface: InterfaceState) -> int:
        return interface.free_ipv6 if family is Family.IPV6 else interface.free_ipv4

    best: InterfaceState | None = None
    for interface in sorted(interfaces, key=lambda i: i.device_index):
        if interface.device_index < spec.first_interface_index or free(interface) <= 0:
            continue
        if best is None or free(interface) > free(best):
            best = interface
    if best is None:
        return NoAction(DeficitReason.NOTHING_RELEASABLE, f"{excess} in excess, no interface holds a free address")
    return ReleaseAction(best.id, best.subnet_id, min(free(best), excess), family)


def _free_device_indexes(spec: NodeSpec, interfaces: Sequence[InterfaceState], limits: InstanceLimits) -> list[int]:
    """Device indexes in [first_interface_index, max_interfaces) without an interface."""
    slots_left = limits.max_interfaces - len(interfaces)
    if slots_left <= 0:
        return []
    taken = {i.device_index for i in interfaces}
    free = [d for d in range(spec.first_interface_index, limits.max_interfaces) if d not in taken]
    return free[:slots_left]


def _subnet_for_new_interface(
    spec: NodeSpec,
    interfaces: Sequence[InterfaceState],
    limits: InstanceLimits,
    subnets: Sequence[Subnet],
) -> Subnet | None:
    """By subnet ids, else by subnet tags (never widened); else the node's own subnet if it can
    fill a whole interface, else the subnet of the node's VPC and zone with the most free addresses.
    Among candidates the most free addresses wins. A subnet needs 2 free addresses: primary + 1."""
    usable = [
        s
        for s in subnets
        if s.free_addresses > 1
        and (not spec.vpc_id or s.vpc_id == spec.vpc_id)
        and (not spec.availability_zone or s.availability_zone == spec.availability_zone)
    ]
    if spec.subnet_ids:
        candidates = [s for s in usable if s.id in spec.subnet_ids]
    elif spec.subnet_tags:
        candidates = [s for s in usable if all(s.tags.get(k) == v for k, v in spec.subnet_tags.items())]
    else:
        node_subnet_id = next((i.subnet_id for i in interfaces if i.device_index == 0), "")
        for s in usable:
            if s.id == node_subnet_id and s.free_addresses >= limits.ipv4_per_interface:
                return s
        candidates = usable
    return min(candidates, key=lambda s: (-s.free_addresses, s.id), default=None)


def security_groups_by_tags(groups: Sequence[SecurityGroup], vpc_id: str, tags: Mapping[str, str]) -> tuple[str, ...]:
    """The groups of `vpc_id` (any VPC when "") that carry every one of `tags`, by id; none for no tags."""
    if not tags:
        return ()
    return tuple(
        sorted(
            g.id
            for g in groups
            if (not vpc_id or g.vpc_id == vpc_id) and all(g.tags.get(k) == v for k, v in tags.items())
        )
    )


def _security_groups(spec: NodeSpec, interfaces: Sequence[InterfaceState]) -> tuple[str, ...]:
    """The spec's security groups, else those of the primary interface."""
    if spec.security_group_ids:
        return spec.security_group_ids
    return next((i.security_group_ids for i in interfaces if i.device_index == 0), ())
