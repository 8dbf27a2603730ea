"""The worker's planner: decide the one next step for a node, without any I/O.

The generic half of Cilium's node loop (`determineMaintenanceAction` in pkg/ipam/node.go): the
pool's arithmetic says how many addresses are needed or in excess, and the cloud's policy (the
provider's `prepare_allocation` / `prepare_release`, as `PrepareIPAllocation` /
`PrepareIPRelease` of pkg/aws/eni/node.go for EC2) says where: which interface, subnet, device
index and security groups. `decide` takes what a maintenance has read of the node (`NodeState`)
and returns one `Step`: read something more, an action to apply, or `NoAction` with the reason to
stop. The maintainer applies the step, reads the state again, and asks again.

`plan` covers IPv4, whose per-interface slots and subnet capacity shape every step. IPv6 addresses
only ride on the interfaces IPv4 brought: the policy picks where they are assigned, and
`plan_ipv6_release` where their excess is given back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from services.cloudworker.model import (
    Action,
    AllocationAction,
    AssignIPv6,
    InstanceLimits,
    NetworkInterface,
    NoAction,
    NodeSpec,
    ReleaseAction,
    SecurityGroup,
    Subnet,
)
from services.cloudworker.providers.base import CloudPolicy
from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks, pool_excess_ips, pool_needed_ips, pool_surge_needed_ips
from services.core.reasons import DeficitReason

__all__ = [
    "Action",
    "AllocationAction",
    "AssignIPv6",
    "Direction",
    "NoAction",
    "NodeSpec",
    "NodeState",
    "PoolCounts",
    "Progress",
    "ReadPool",
    "ReadSecurityGroups",
    "ReleaseAction",
    "Step",
    "Watermarks",
    "advance",
    "decide",
    "plan",
    "plan_ipv6_release",
    "security_groups_by_tags",
]


@dataclass(frozen=True, slots=True)
class ReadPool:
    """Which of the pool's addresses are free must be known first (a release is coming)."""


@dataclass(frozen=True, slots=True)
class ReadSecurityGroups:
    """The groups carrying the spec's tags must be known first (a new interface is coming)."""


Step = ReadPool | ReadSecurityGroups | AssignIPv6 | AllocationAction | ReleaseAction | NoAction


class Direction(Enum):
    """The way a maintenance goes, set by its first step that moved addresses."""

    REFILL = "refilled"
    GIVE_BACK = "gave back"


@dataclass(frozen=True, slots=True)
class Progress:
    """What a maintenance has done so far, as far as its next decision goes: the way it went (it
    refills or gives back, never both: what the other way needs waits for the next maintenance),
    and the families whose assign or release came back empty (not tried again)."""

    direction: Direction | None = None
    nothing_assigned: frozenset[Family] = frozenset()
    nothing_reserved: frozenset[Family] = frozenset()


def advance(progress: Progress, step: Step, moved: bool) -> Progress:
    """The progress after `step` was carried out; `moved`: whether it moved any address."""
    match step:
        case AssignIPv6() | AllocationAction() if moved:
            return replace(progress, direction=Direction.REFILL)
        case AssignIPv6():
            return replace(progress, nothing_assigned=progress.nothing_assigned | {Family.IPV6})
        case ReleaseAction() if moved:
            return replace(progress, direction=Direction.GIVE_BACK)
        case ReleaseAction(family=family):
            return replace(progress, nothing_reserved=progress.nothing_reserved | {family})
    return progress


@dataclass(frozen=True, slots=True)
class NodeState:
    """What a maintenance knows of its node at one moment: the pool (from the allocator), the
    cloud (from the view or a read), and what it learnt on the way."""

    spec: NodeSpec
    limits: InstanceLimits
    interfaces: tuple[NetworkInterface, ...]  # attached, by device index
    subnets: tuple[Subnet, ...]  # of the node's VPC and zone, those refused as full left out
    ipv4: PoolCounts
    needed_ipv4: int = 0  # the allocator's statistics
    excess_ipv4: int = 0
    waiting_ipv4: int = 0  # callers waiting for a refill (Cilium's pending pods)
    ipv6_enabled: bool = False
    ipv6: PoolCounts = field(default_factory=lambda: PoolCounts(0, 0))
    needed_ipv6: int = 0
    excess_ipv6: int = 0
    waiting_ipv6: int = 0
    allocated_ipv4: frozenset[str] | None = None  # from the pool's Dump; None = not read
    free_ipv6: frozenset[str] | None = None
    tagged_security_groups: tuple[str, ...] | None = None  # those carrying the spec's tags; None = not read
    progress: Progress = field(default_factory=Progress)
    no_prefix_room: frozenset[str] = frozenset()  # subnets that had no free /28 lately (prefixes backed off)


def decide(state: NodeState, policy: CloudPolicy) -> Step:
    """The one next step for the node: IPv6 assigned where there is room, IPv6 excess given back,
    then the IPv4 step of `plan`; never a refill once the maintenance gave back, nor the reverse."""
    direction = state.progress.direction
    if direction is not Direction.GIVE_BACK and (assign := _ipv6_assign(state, policy)) is not None:
        return assign
    if direction is not Direction.REFILL and (release := _ipv6_release(state, policy)) is not None:
        return release
    step = _ipv4_step(state, policy)
    turning = (isinstance(step, AllocationAction | ReadSecurityGroups) and direction is Direction.GIVE_BACK) or (
        isinstance(step, ReleaseAction | ReadPool) and direction is Direction.REFILL
    )
    if turning:
        return NoAction(
            DeficitReason.OTHER_WAY_NEXT, f"this maintenance {direction.value}: the other way is the next's"
        )
    return step


def _ipv6_assign(state: NodeState, policy: CloudPolicy) -> AssignIPv6 | None:
    """IPv6 addresses where the policy finds room, for the deficit and the callers waiting that the
    free addresses do not cover (the allocator's needed_ipv6 is 0 for a pool holding a /80)."""
    if state.needed_ipv6 <= 0 and state.waiting_ipv6 <= 0:
        return None
    wanted = pool_surge_needed_ips(state.ipv6, state.spec.watermarks, state.waiting_ipv6)  # IPv6 waiters are its surge
    if not state.ipv6_enabled or wanted <= 0 or Family.IPV6 in state.progress.nothing_assigned:
        return None
    return policy.prepare_ipv6_allocation(state.spec, state.interfaces, state.limits, wanted)


def _ipv6_release(state: NodeState, policy: CloudPolicy) -> ReadPool | ReleaseAction | None:
    """IPv6's excess given back: with release_excess, or all that is free once IPv6 is switched off."""
    spec = state.spec
    gives_back = spec.release_excess or not state.ipv6_enabled
    if not gives_back or state.excess_ipv6 <= 0 or Family.IPV6 in state.progress.nothing_reserved:
        return None
    if state.free_ipv6 is None:
        return ReadPool()
    if not state.ipv6_enabled:  # switched off: nothing is kept free
        spec = replace(spec, watermarks=Watermarks(pre_allocate=0), release_excess=True)
    attached = [i for i in state.interfaces if i.device_index >= 0]
    release = plan_ipv6_release(spec, state.ipv6, attached, state.free_ipv6, policy=policy)
    return release if isinstance(release, ReleaseAction) else None


def _ipv4_step(state: NodeState, policy: CloudPolicy) -> Step:
    """IPv4's step of `plan`, after the reads it needs."""
    spec = state.spec
    # Which addresses of an interface are free matters only to a release: read them only then.
    releasing = spec.release_excess and state.excess_ipv4 > 0 and state.needed_ipv4 <= 0
    exhausted = Family.IPV4 in state.progress.nothing_reserved
    if releasing and state.allocated_ipv4 is None and not exhausted:
        return ReadPool()
    attached = [i for i in state.interfaces if i.device_index >= 0]
    allocated = state.allocated_ipv4 if releasing and state.allocated_ipv4 is not None else frozenset()
    action = plan(
        spec,
        state.ipv4,
        attached,
        state.limits,
        state.subnets,
        waiting_ipv4=state.waiting_ipv4,
        policy=policy,
        tagged_security_groups=state.tagged_security_groups or (),
        free_ipv4=frozenset(a for i in attached for a in i.pool_ipv4 if a not in allocated),
        no_prefix_room=state.no_prefix_room,
    )
    if isinstance(action, ReleaseAction) and exhausted:
        return NoAction(DeficitReason.NOTHING_RELEASABLE, "a release found nothing to reserve")
    if (
        isinstance(action, AllocationAction)
        and action.creates_interface
        and spec.security_group_tags
        and state.tagged_security_groups is None
    ):
        return ReadSecurityGroups()
    return action


def plan(
    spec: NodeSpec,
    counts: PoolCounts,
    interfaces: Sequence[NetworkInterface],
    limits: InstanceLimits,
    subnets: Sequence[Subnet],
    waiting_ipv4: int = 0,
    *,
    policy: CloudPolicy,
    tagged_security_groups: Sequence[str] = (),
    free_ipv4: Collection[str] = frozenset(),
    no_prefix_room: Collection[str] = frozenset(),
) -> Action:
    """The one next step for the node's IPv4 pool.

    `waiting_ipv4` counts callers waiting for a refill (Cilium's pending pods, its surge): they are
    counted as used, so one step serves them and still leaves the watermark free (and free addresses
    a refill just brought are not asked for again for waiters not yet woken).
    Release wins only when there is excess, no deficit, and `spec.release_excess` is set; it
    gives back only addresses among `free_ipv4` (the pool's free ones).
    `subnets` should hold the subnets of the node's VPC and zone; the policy does not use an
    existing interface whose subnet is missing from it (its free addresses are unknown).
    With `spec.prefix_delegation` the policy turns the deficit into /28 prefixes (16 addresses
    each), except in the subnets of `no_prefix_room`.
    """
    if limits.max_interfaces <= 0 or limits.ipv4_per_interface <= 0:
        raise ValueError(f"instance limits unknown or invalid: {limits}")
    w = spec.watermarks
    needed = pool_surge_needed_ips(counts, w, waiting_ipv4)
    if needed > 0:
        wanted = needed + w.max_above_watermark
        if w.max_allocate > 0:
            wanted = min(wanted, w.max_allocate - counts.available)
            if wanted <= 0:
                detail = f"pool holds {counts.available} of max_allocate {w.max_allocate}"
                return NoAction(DeficitReason.MAX_ALLOCATE, detail)
        return policy.prepare_allocation(
            spec, wanted, interfaces, limits, subnets, tuple(tagged_security_groups), no_prefix_room
        )

    excess = pool_excess_ips(counts, w)
    if excess > 0:
        if spec.release_excess:
            return policy.prepare_release(spec, interfaces, free_ipv4, excess, Family.IPV4)
        return NoAction(DeficitReason.NOTHING_NEEDED, f"{excess} in excess, release disabled")
    if w.max_allocate > 0 and pool_needed_ips(counts, replace(w, max_allocate=0)) > 0:
        return NoAction(DeficitReason.MAX_ALLOCATE, f"pool holds {counts.available} of max_allocate {w.max_allocate}")
    return NoAction(DeficitReason.NOTHING_NEEDED)


def plan_ipv6_release(
    spec: NodeSpec,
    counts: PoolCounts,
    interfaces: Sequence[NetworkInterface],
    free_ipv6: Collection[str],
    *,
    policy: CloudPolicy,
) -> Action:
    """The next step for the node's IPv6 excess: a release (with `spec.release_excess`) or nothing."""
    excess = pool_excess_ips(counts, spec.watermarks)
    if excess <= 0 or pool_needed_ips(counts, spec.watermarks) > 0:
        return NoAction(DeficitReason.NOTHING_NEEDED)
    if not spec.release_excess:
        return NoAction(DeficitReason.NOTHING_NEEDED, f"{excess} IPv6 in excess, release disabled")
    return policy.prepare_release(spec, interfaces, free_ipv6, excess, Family.IPV6)


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
