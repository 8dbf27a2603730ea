"""The planner with EC2's policy, one scenario per row: what it should do for a node in a given state."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from services.cloudworker import planner
from services.cloudworker.model import InstanceLimits, NetworkInterface, SecurityGroup, Subnet
from services.cloudworker.planner import (
    Action,
    AllocationAction,
    AssignIPv6,
    Direction,
    NoAction,
    NodeSpec,
    NodeState,
    PoolCounts,
    Progress,
    ReadPool,
    ReadSecurityGroups,
    ReleaseAction,
    Step,
    Watermarks,
    advance,
    decide,
    security_groups_by_tags,
)
from services.cloudworker.providers.aws import Ec2Policy
from services.core.family import Family
from services.core.reasons import DeficitReason

EC2 = Ec2Policy()  # the planner's arithmetic with EC2's choices


def plan(*args: Any, **kwargs: Any) -> Action:
    return planner.plan(*args, policy=EC2, **kwargs)


def plan_ipv6_release(*args: Any) -> Action:
    return planner.plan_ipv6_release(*args, policy=EC2)


M5_LARGE = InstanceLimits(max_interfaces=3, ipv4_per_interface=10, ipv6_per_interface=10)
VPC, ZONE = "vpc-1", "us-east-1a"


def subnet(id: str, free: int, *, tags: dict[str, str] | None = None, vpc: str = VPC, zone: str = ZONE) -> Subnet:
    return Subnet(id, vpc, zone, "10.0.0.0/20", free, tags or {})


def eni(
    device: int, *, ips: int = 1, free: int = 0, subnet: str = "node", groups: tuple[str, ...] = ()
) -> NetworkInterface:
    """Interface `eth<device>` holding `ips` IPv4 addresses (primary included), `free` of them free in
    the pool (those in 10.<device>.255.0/24, see `free_of`)."""
    secondaries = [f"10.{device}.255.{n}" for n in range(free)] + [f"10.{device}.0.{n}" for n in range(ips - 1 - free)]
    return NetworkInterface(
        f"eth{device}",
        f"02:00:00:00:00:0{device}",
        device,
        subnet,
        "10.0.0.0/8",
        f"10.{device}.1.1",
        ipv4=tuple(secondaries),
        security_group_ids=groups,
    )


def free_of(interfaces: Sequence[NetworkInterface]) -> frozenset[str]:
    """The addresses `eni` and `v6` made free in the pool."""
    return frozenset(a for i in interfaces for a in (*i.ipv4, *i.ipv6) if a.split(".")[2:3] == ["255"] or ":ff::" in a)


NODE_SUBNET = subnet("node", 4000)
SPEC = NodeSpec(vpc_id=VPC, availability_zone=ZONE)


@dataclass(frozen=True)
class Case:
    counts: PoolCounts
    interfaces: tuple[NetworkInterface, ...]
    expected: Action
    spec: NodeSpec = SPEC
    subnets: tuple[Subnet, ...] = (NODE_SUBNET,)
    limits: InstanceLimits = M5_LARGE
    watermarks: dict[str, int] = field(default_factory=dict)


def allocate_on(device: int, count: int, subnet_id: str = "node") -> AllocationAction:
    return AllocationAction(count=count, subnet_id=subnet_id, device_index=device, interface_id=f"eth{device}")


def create_at(device: int, count: int, subnet_id: str = "node", groups: tuple[str, ...] = ()) -> AllocationAction:
    return AllocationAction(count=count, subnet_id=subnet_id, device_index=device, security_group_ids=groups)


CASES = {
    # --- allocation on existing interfaces -----------------------------------------------------
    "m5.large empty, pre_allocate 8: allocate 8 on eth0": Case(
        PoolCounts(available=0, used=0), (eni(0),), allocate_on(0, 8)
    ),
    "max_above_watermark is added to the amount": Case(
        PoolCounts(0, 0), (eni(0),), allocate_on(0, 9), watermarks={"max_above_watermark": 1}
    ),
    "amount bounded by the free slots of the interface": Case(
        PoolCounts(available=4, used=4), (eni(0, ips=5),), allocate_on(0, 5)
    ),
    "amount bounded by the free addresses of the subnet": Case(
        PoolCounts(0, 0), (eni(0),), allocate_on(0, 3), subnets=(subnet("node", 3),)
    ),
    "full eth0 is skipped, eth1 has room": Case(
        PoolCounts(available=11, used=10), (eni(0, ips=10), eni(1, ips=3)), allocate_on(1, 7)
    ),
    "cooling addresses are not free headroom": Case(
        PoolCounts(available=8, used=0, cooling=8), (eni(0, ips=9),), allocate_on(0, 1)
    ),
    # --- creating an interface --------------------------------------------------------------------
    "all interfaces full: create at the lowest free device index": Case(
        PoolCounts(available=18, used=15), (eni(0, ips=10), eni(2, ips=10)), create_at(1, 5)
    ),
    "a new interface holds at most ipv4_per_interface - 1 secondaries": Case(
        PoolCounts(available=9, used=9), (eni(0, ips=10),), create_at(1, 9), watermarks={"pre_allocate": 12}
    ),
    "a new interface leaves a subnet address for its primary": Case(
        PoolCounts(available=9, used=9),
        (eni(0, ips=10),),
        create_at(1, 3, "pods"),
        spec=replace(SPEC, subnet_ids=("pods",)),
        subnets=(NODE_SUBNET, subnet("pods", 4)),
    ),
    "first_interface_index=1: eth0 has room but is not for pods": Case(
        PoolCounts(0, 0), (eni(0),), create_at(1, 8), spec=replace(SPEC, first_interface_index=1)
    ),
    "first_interface_index=1: eth1 then used": Case(
        PoolCounts(available=2, used=2),
        (eni(0), eni(1, ips=3)),
        allocate_on(1, 7),
        spec=replace(SPEC, first_interface_index=1),
    ),
    "security groups of the spec": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10, groups=("sg-node",)),),
        create_at(1, 8, groups=("sg-pods",)),
        spec=replace(SPEC, security_group_ids=("sg-pods",)),
    ),
    "security groups copied from the primary interface": Case(
        PoolCounts(9, 9), (eni(0, ips=10, groups=("sg-node",)),), create_at(1, 8, groups=("sg-node",))
    ),
    # --- subnet choice ----------------------------------------------------------------------------
    "subnet ids: the one with most free addresses wins": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        create_at(1, 8, "b"),
        spec=replace(SPEC, subnet_ids=("a", "b")),
        subnets=(NODE_SUBNET, subnet("a", 100), subnet("b", 500), subnet("not-listed", 4000)),
    ),
    "subnet ids: a full one is passed over for the next": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        create_at(1, 8, "b"),
        spec=replace(SPEC, subnet_ids=("a", "b")),
        subnets=(NODE_SUBNET, subnet("a", 0), subnet("b", 50)),
    ),
    "subnet ids: all full is subnet-full": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        NoAction(DeficitReason.SUBNET_FULL),
        spec=replace(SPEC, subnet_ids=("a", "b")),
        subnets=(NODE_SUBNET, subnet("a", 0), subnet("b", 1)),
    ),
    "subnet tags: only a subnet with every tag": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        create_at(1, 8, "a"),
        spec=replace(SPEC, subnet_tags={"pods": "true", "tier": "1"}),
        subnets=(
            NODE_SUBNET,
            subnet("a", 100, tags={"pods": "true", "tier": "1", "x": "y"}),
            subnet("half", 900, tags={"pods": "true"}),
        ),
    ),
    "subnet tags matching no subnet is subnet-full": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        NoAction(DeficitReason.SUBNET_FULL),
        spec=replace(SPEC, subnet_tags={"pods": "true"}),
        subnets=(NODE_SUBNET, subnet("other", 900, tags={"pods": "false"})),
    ),
    "neither ids nor tags: the node's own subnet, even if another is larger": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        create_at(1, 8, "node"),
        subnets=(subnet("node", 1000), subnet("big", 4000)),
    ),
    "the node's subnet cannot fill an interface: largest of VPC and zone": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        create_at(1, 8, "big"),
        subnets=(subnet("node", 5), subnet("big", 3000), subnet("other-zone", 4000, zone="us-east-1b")),
    ),
    "subnets of another VPC or zone are never used": Case(
        PoolCounts(9, 9),
        (eni(0, ips=10),),
        NoAction(DeficitReason.SUBNET_FULL),
        subnets=(subnet("node", 0), subnet("b", 4000, zone="us-east-1b"), subnet("c", 4000, vpc="vpc-2")),
    ),
    "interface with room in a full subnet: a new interface elsewhere": Case(
        PoolCounts(0, 0),
        (eni(0),),
        create_at(1, 8, "pods"),
        spec=replace(SPEC, subnet_ids=("pods",)),
        subnets=(subnet("node", 0), subnet("pods", 100)),
    ),
    "interface with room in a full subnet and no slot left: subnet-full": Case(
        PoolCounts(available=20, used=20),
        (eni(0, ips=10), eni(1, ips=10), eni(2, ips=1, subnet="full")),
        NoAction(DeficitReason.SUBNET_FULL),
        subnets=(NODE_SUBNET, subnet("full", 0)),
    ),
    # --- limits -----------------------------------------------------------------------------------
    "Cilium: m5.large after 25 allocations is at capacity with 27 usable": Case(
        PoolCounts(available=27, used=25),
        (eni(0, ips=10), eni(1, ips=10), eni(2, ips=10)),
        NoAction(DeficitReason.AT_CAPACITY),
    ),
    "first_interface_index=1: capacity 18": Case(
        PoolCounts(available=18, used=18),
        (eni(0), eni(1, ips=10), eni(2, ips=10)),
        NoAction(DeficitReason.AT_CAPACITY),
        spec=replace(SPEC, first_interface_index=1),
    ),
    "never more interfaces than the instance takes, whatever their indexes": Case(
        PoolCounts(available=27, used=27),
        (eni(0, ips=10), eni(2, ips=10), eni(5, ips=10)),
        NoAction(DeficitReason.AT_CAPACITY),
    ),
    "max_allocate caps the amount": Case(
        PoolCounts(0, 0),
        (eni(0),),
        allocate_on(0, 6),
        watermarks={"max_allocate": 6, "max_above_watermark": 5},
    ),
    "max_allocate reached while short of pre_allocate: max-allocate": Case(
        PoolCounts(available=10, used=8),
        (eni(0, ips=10), eni(1, ips=2)),
        NoAction(DeficitReason.MAX_ALLOCATE),
        watermarks={"max_allocate": 10},
    ),
    "min_allocate raises the first amount": Case(
        PoolCounts(0, 0), (eni(0),), allocate_on(0, 9), watermarks={"min_allocate": 12}
    ),
    # --- nothing, and release -----------------------------------------------------------------------
    "pre_allocate free addresses: nothing needed": Case(
        PoolCounts(available=8, used=0), (eni(0, ips=9, free=8),), NoAction(DeficitReason.NOTHING_NEEDED)
    ),
    "excess released from the interface with most free addresses": Case(
        PoolCounts(available=20, used=2),
        (eni(0, ips=10, free=7), eni(1, ips=10, free=9), eni(2, ips=3, free=2)),
        ReleaseAction("eth1", "node", 9),
        spec=replace(SPEC, release_excess=True),
    ),
    "release bounded by the excess": Case(
        PoolCounts(available=12, used=1),
        (eni(0, ips=10, free=6), eni(1, ips=4, free=3)),
        ReleaseAction("eth0", "node", 3),
        spec=replace(SPEC, release_excess=True),
    ),
    "release skips interfaces below first_interface_index": Case(
        PoolCounts(available=12, used=0),
        (eni(0, ips=4, free=3), eni(1, ips=10, free=9)),
        ReleaseAction("eth1", "node", 4),
        spec=replace(SPEC, release_excess=True, first_interface_index=1),
    ),
    "excess but release disabled: nothing needed": Case(
        PoolCounts(available=20, used=2),
        (eni(0, ips=10, free=9), eni(1, ips=10, free=9)),
        NoAction(DeficitReason.NOTHING_NEEDED),
    ),
    "excess but no interface holds a free address": Case(
        PoolCounts(available=20, used=2),
        (eni(0, ips=10), eni(1, ips=10)),
        NoAction(DeficitReason.NOTHING_RELEASABLE),
        spec=replace(SPEC, release_excess=True),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_plan(case: Case) -> None:
    spec = replace(case.spec, watermarks=replace(case.spec.watermarks, **case.watermarks))
    action = plan(spec, case.counts, case.interfaces, case.limits, case.subnets, free_ipv4=free_of(case.interfaces))
    if isinstance(case.expected, NoAction):
        assert isinstance(action, NoAction), action
        assert action.reason == case.expected.reason
    else:
        assert action == case.expected


def v6(device: int, free: int) -> NetworkInterface:
    """Interface `eth<device>` holding `free` IPv6 addresses the pool holds free, and one it does not."""
    addresses = (f"2001:db8:{device}::1", *(f"2001:db8:{device}:ff::{n}" for n in range(free)))
    return replace(eni(device, ips=2), ipv6=addresses)


RELEASING = replace(SPEC, release_excess=True)

# IPv6 counts (available, used), interfaces, spec, expected
IPV6_RELEASE_CASES = {
    "at the watermark: nothing": (PoolCounts(10, 2), (v6(0, 8),), RELEASING, NoAction(DeficitReason.NOTHING_NEEDED)),
    "below the watermark: nothing (the maintainer assigns)": (
        PoolCounts(4, 2),
        (v6(0, 2),),
        RELEASING,
        NoAction(DeficitReason.NOTHING_NEEDED),
    ),
    "excess from the interface with most free IPv6, bounded by the excess": (
        PoolCounts(20, 2),
        (v6(0, 4), v6(1, 14)),
        RELEASING,
        ReleaseAction("eth1", "node", 10, Family.IPV6),
    ),
    "bounded by the interface's free IPv6": (
        PoolCounts(20, 2),
        (v6(0, 5), v6(1, 5), v6(2, 8)),
        RELEASING,
        ReleaseAction("eth2", "node", 8, Family.IPV6),
    ),
    "skips interfaces below first_interface_index": (
        PoolCounts(20, 2),
        (v6(0, 18), v6(1, 3)),
        replace(RELEASING, first_interface_index=1),
        ReleaseAction("eth1", "node", 3, Family.IPV6),
    ),
    "release disabled: nothing": (PoolCounts(20, 2), (v6(0, 18),), SPEC, NoAction(DeficitReason.NOTHING_NEEDED)),
    "excess but no interface holds a free IPv6 address": (
        PoolCounts(20, 2),
        (v6(0, 0), v6(1, 0)),
        RELEASING,
        NoAction(DeficitReason.NOTHING_RELEASABLE),
    ),
}


@pytest.mark.parametrize("case", IPV6_RELEASE_CASES.values(), ids=IPV6_RELEASE_CASES.keys())
def test_plan_ipv6_release(case: tuple[PoolCounts, tuple[NetworkInterface, ...], NodeSpec, Action]) -> None:
    counts, interfaces, spec, expected = case
    action = plan_ipv6_release(spec, counts, interfaces, free_of(interfaces))
    if isinstance(expected, NoAction):
        assert isinstance(action, NoAction), action
        assert action.reason == expected.reason
    else:
        assert action == expected


def test_at_capacity_detail_names_the_27_usable_addresses_of_an_m5_large() -> None:
    assert M5_LARGE.capacity() == 27
    action = plan(SPEC, PoolCounts(27, 25), (eni(0, ips=10), eni(1, ips=10), eni(2, ips=10)), M5_LARGE, [NODE_SUBNET])
    assert action == NoAction(DeficitReason.AT_CAPACITY, "27 usable addresses, all attached")


def test_m5_large_grows_to_27_addresses_then_reports_at_capacity() -> None:
    """Cilium's scenario end to end: pods arrive one by one, the worker runs every action."""
    interfaces = {0: eni(0)}
    counts = PoolCounts(0, 0)

    def run_worker() -> Action:
        nonlocal counts
        while isinstance(
            action := plan(SPEC, counts, list(interfaces.values()), M5_LARGE, [NODE_SUBNET]), AllocationAction
        ):
            held = interfaces[action.device_index].ipv4_count if not action.creates_interface else 1
            interfaces[action.device_index] = eni(action.device_index, ips=held + action.count)
            counts = replace(counts, available=counts.available + action.count)
        return action

    for _ in range(25):
        run_worker()
        assert counts.available > counts.used, "a pod found no free address"
        counts = replace(counts, used=counts.used + 1)
    assert counts == PoolCounts(available=27, used=25)
    assert [i.ipv4_count for i in interfaces.values()] == [10, 10, 10]
    assert run_worker() == NoAction(DeficitReason.AT_CAPACITY, "27 usable addresses, all attached")


def test_unknown_limits_are_refused_not_planned_as_zero() -> None:
    with pytest.raises(ValueError, match="limits"):
        plan(SPEC, PoolCounts(0, 0), [eni(0)], InstanceLimits(0, 0), [NODE_SUBNET])


def test_watermark_defaults_are_cilium_s() -> None:
    assert NodeSpec().watermarks == Watermarks(pre_allocate=8, min_allocate=0, max_allocate=0, max_above_watermark=0)


def test_planner_imports_no_io_library() -> None:
    code = (
        "import sys, services.cloudworker.planner; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'redis', 'boto3', 'botocore'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("waiting,available,used,expected", [(0, 0, 0, 8), (5, 0, 0, 9), (20, 0, 0, 9)])
def test_waiting_callers_are_added_to_the_deficit(waiting: int, available: int, used: int, expected: int) -> None:
    limits = InstanceLimits(max_interfaces=3, ipv4_per_interface=10)
    eth0 = NetworkInterface("eni-0", "02:00", 0, "subnet-a", "10.0.0.0/18", "10.0.0.10")
    subnet = Subnet(id="subnet-a", vpc_id="vpc", availability_zone="az", cidr="10.0.0.0/18", free_addresses=10_000)
    action = plan(NodeSpec(), PoolCounts(available, used), [eth0], limits, [subnet], waiting_ipv4=waiting)
    assert isinstance(action, AllocationAction) and action.interface_id == "eni-0"
    assert action.count == expected


def test_waiting_callers_never_pass_max_allocate() -> None:
    limits = InstanceLimits(max_interfaces=3, ipv4_per_interface=10)
    eth0 = NetworkInterface("eni-0", "02:00", 0, "subnet-a", "10.0.0.0/18", "10.0.0.10")
    subnet = Subnet(id="subnet-a", vpc_id="vpc", availability_zone="az", cidr="10.0.0.0/18", free_addresses=10_000)
    spec = NodeSpec(watermarks=Watermarks(pre_allocate=0, max_allocate=4))
    action = plan(spec, PoolCounts(4, 4), [eth0], limits, [subnet], waiting_ipv4=3)
    assert isinstance(action, NoAction) and action.reason == DeficitReason.MAX_ALLOCATE


GROUPS = (
    SecurityGroup("sg-b", "vpc-1", {"role": "pods", "team": "net"}),
    SecurityGroup("sg-a", "vpc-1", {"role": "pods"}),
    SecurityGroup("sg-c", "vpc-1", {"role": "nodes"}),
    SecurityGroup("sg-d", "vpc-2", {"role": "pods"}),
)


@pytest.mark.parametrize(
    "vpc_id,tags,expected",
    [
        ("vpc-1", {"role": "pods"}, ("sg-a", "sg-b")),  # every group carrying the tag, by id
        ("vpc-1", {"role": "pods", "team": "net"}, ("sg-b",)),  # all tags must match
        ("vpc-2", {"role": "pods"}, ("sg-d",)),  # only the node's VPC
        ("", {"role": "pods"}, ("sg-a", "sg-b", "sg-d")),  # no VPC known: any
        ("vpc-1", {"role": "db"}, ()),  # none carries it: the caller falls back to the primary's
        ("vpc-1", {}, ()),  # no tags asked for
    ],
)
def test_security_groups_by_tags(vpc_id: str, tags: dict[str, str], expected: tuple[str, ...]) -> None:
    assert security_groups_by_tags(GROUPS, vpc_id, tags) == expected


# --- decide: the maintenance's next step, against a fake policy ----------------------------------


@dataclass
class FakePolicy:
    """Answers what it is told to and records what it was asked (the policy's arguments)."""

    allocation: AllocationAction | NoAction = field(default_factory=lambda: allocate_on(0, 1))
    ipv6: AssignIPv6 | None = None
    asked: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def prepare_allocation(
        self,
        spec: NodeSpec,
        wanted: int,
        interfaces: Any,
        limits: InstanceLimits,
        subnets: Any,
        tagged_security_groups: Any = (),
        no_prefix_room: Any = (),
    ) -> AllocationAction | NoAction:
        self.asked.append(("allocation", (wanted, tuple(tagged_security_groups))))
        return self.allocation

    def prepare_release(
        self, spec: NodeSpec, interfaces: Any, free: Any, excess: int, family: Family
    ) -> ReleaseAction | NoAction:
        self.asked.append(("release", (excess, family, {i.id: i.free_count(family, free) for i in interfaces})))
        return ReleaseAction("eni-0", "node", excess, family)

    def prepare_ipv6_allocation(
        self, spec: NodeSpec, interfaces: Any, limits: InstanceLimits, wanted: int
    ) -> AssignIPv6 | None:
        self.asked.append(("ipv6", (wanted,)))
        return self.ipv6


ENI0 = NetworkInterface("eni-0", "02:00", 0, "node", "10.0.0.0/20", "10.0.0.10", ipv4=("10.0.0.11", "10.0.0.12"))
ENI0_V6 = replace(ENI0, ipv6=("2001:db8::1", "2001:db8::2", "2001:db8::3"))
NEW_INTERFACE = AllocationAction(count=5, subnet_id="node", device_index=1)
TAGGED = replace(SPEC, security_group_ids=("sg-instance",), security_group_tags={"role": "pods"})


def state(**fields: Any) -> NodeState:
    defaults: dict[str, Any] = dict(
        spec=SPEC, limits=M5_LARGE, interfaces=(ENI0,), subnets=(NODE_SUBNET,), ipv4=PoolCounts(8, 0)
    )
    return NodeState(**{**defaults, **fields})


@dataclass(frozen=True)
class DecideCase:
    state: NodeState
    expected: Step
    asked: tuple[tuple[str, tuple[Any, ...]], ...]  # what the policy must have been asked, in order
    policy: FakePolicy = field(default_factory=FakePolicy)


DECIDE_CASES = {
    "at the watermark: nothing, the policy not asked": DecideCase(state(), NoAction(DeficitReason.NOTHING_NEEDED), ()),
    "a deficit: where the policy says, for the deficit and the room above the watermark": DecideCase(
        state(spec=replace(SPEC, watermarks=Watermarks(max_above_watermark=2)), ipv4=PoolCounts(3, 0)),
        allocate_on(0, 1),
        (("allocation", (7, ())),),
    ),
    "waiting callers are added to the deficit": DecideCase(
        state(ipv4=PoolCounts(8, 8), waiting_ipv4=3), allocate_on(0, 1), (("allocation", (11, ())),)
    ),
    "max_allocate reached: the policy is not asked": DecideCase(
        state(spec=replace(SPEC, watermarks=Watermarks(max_allocate=4)), ipv4=PoolCounts(4, 2)),
        NoAction(DeficitReason.MAX_ALLOCATE),
        (),
    ),
    "the policy's dead end is the answer": DecideCase(
        state(ipv4=PoolCounts(0, 0)),
        NoAction(DeficitReason.AT_CAPACITY),
        (("allocation", (8, ())),),
        FakePolicy(allocation=NoAction(DeficitReason.AT_CAPACITY)),
    ),
    "excess to give back, the pool not read: read it first": DecideCase(
        state(spec=RELEASING, ipv4=PoolCounts(20, 0), excess_ipv4=12), ReadPool(), ()
    ),
    "excess to give back, the pool read: allocated addresses are not free": DecideCase(
        state(spec=RELEASING, ipv4=PoolCounts(20, 0), excess_ipv4=12, allocated_ipv4=frozenset({"10.0.0.11"})),
        ReleaseAction("eni-0", "node", 12, Family.IPV4),
        (("release", (12, Family.IPV4, {"eni-0": 1})),),
    ),
    "excess without release_excess: nothing, the pool not read": DecideCase(
        state(ipv4=PoolCounts(20, 0), excess_ipv4=12), NoAction(DeficitReason.NOTHING_NEEDED), ()
    ),
    "IPv6 needed: assigned where the policy says, before IPv4's deficit": DecideCase(
        state(ipv4=PoolCounts(0, 0), ipv6_enabled=True, needed_ipv6=8, waiting_ipv6=2),
        AssignIPv6("eni-0", 10),
        (("ipv6", (10,)),),
        FakePolicy(ipv6=AssignIPv6("eni-0", 10)),
    ),
    "IPv6 callers waiting that the free IPv6 addresses cover: none assigned": DecideCase(
        state(ipv6_enabled=True, ipv6=PoolCounts(12, 0), waiting_ipv6=2),
        NoAction(DeficitReason.NOTHING_NEEDED),
        (),
        FakePolicy(ipv6=AssignIPv6("eni-0", 2)),
    ),
    "IPv6 needed but no interface has room: IPv4's step": DecideCase(
        state(ipv4=PoolCounts(0, 0), ipv6_enabled=True, needed_ipv6=8),
        allocate_on(0, 1),
        (("ipv6", (8,)), ("allocation", (8, ()))),
    ),
    "an IPv6 assign brought nothing in this maintenance: not asked again": DecideCase(
        state(
            ipv4=PoolCounts(0, 0),
            ipv6_enabled=True,
            needed_ipv6=8,
            progress=Progress(nothing_assigned=frozenset({Family.IPV6})),
        ),
        allocate_on(0, 1),
        (("allocation", (8, ())),),
        FakePolicy(ipv6=AssignIPv6("eni-0", 8)),
    ),
    "IPv6 excess, the pool not read: read it first": DecideCase(
        state(spec=RELEASING, ipv6_enabled=True, ipv6=PoolCounts(20, 0), excess_ipv6=12), ReadPool(), ()
    ),
    "IPv6 switched off: its free addresses go back without release_excess": DecideCase(
        state(ipv6=PoolCounts(3, 1), excess_ipv6=2, interfaces=(ENI0_V6,), free_ipv6=frozenset({"2001:db8::1"})),
        ReleaseAction("eni-0", "node", 2, Family.IPV6),
        (("release", (2, Family.IPV6, {"eni-0": 1})),),
    ),
    "an IPv6 release found nothing to reserve: IPv4's step": DecideCase(
        state(
            ipv6=PoolCounts(3, 1),
            excess_ipv6=2,
            free_ipv6=frozenset(),
            progress=Progress(nothing_reserved=frozenset({Family.IPV6})),
        ),
        NoAction(DeficitReason.NOTHING_NEEDED),
        (),
    ),
    "a new interface with groups by tags, not read yet: read them first": DecideCase(
        state(spec=TAGGED, ipv4=PoolCounts(0, 0)),
        ReadSecurityGroups(),
        (("allocation", (8, ())),),
        FakePolicy(allocation=NEW_INTERFACE),
    ),
    "a new interface with groups by tags, read: the policy gets them": DecideCase(
        state(spec=TAGGED, ipv4=PoolCounts(0, 0), tagged_security_groups=("sg-pods",)),
        NEW_INTERFACE,
        (("allocation", (8, ("sg-pods",))),),
        FakePolicy(allocation=NEW_INTERFACE),
    ),
    # A maintenance decides once: it refills or gives back, never both on one node (a release and
    # then an allocation on the same interface is two mutating calls for nothing).
    "gave back in this maintenance, a deficit since: left for the next maintenance": DecideCase(
        state(spec=RELEASING, ipv4=PoolCounts(0, 0), needed_ipv4=8, progress=Progress(Direction.GIVE_BACK)),
        NoAction(DeficitReason.OTHER_WAY_NEXT),
        (("allocation", (8, ())),),
    ),
    "gave back in this maintenance: no IPv6 assigned either": DecideCase(
        state(ipv6_enabled=True, needed_ipv6=8, progress=Progress(Direction.GIVE_BACK)),
        NoAction(DeficitReason.NOTHING_NEEDED),
        (),
        FakePolicy(ipv6=AssignIPv6("eni-0", 8)),
    ),
    "refilled in this maintenance, an excess since: nothing given back, the pool not read": DecideCase(
        state(spec=RELEASING, ipv4=PoolCounts(20, 0), excess_ipv4=12, progress=Progress(Direction.REFILL)),
        NoAction(DeficitReason.OTHER_WAY_NEXT),
        (),
    ),
    "refilled in this maintenance: no IPv6 given back either": DecideCase(
        state(
            spec=RELEASING,
            ipv6_enabled=True,
            ipv6=PoolCounts(20, 0),
            excess_ipv6=12,
            interfaces=(ENI0_V6,),
            free_ipv6=frozenset(ENI0_V6.ipv6),
            progress=Progress(Direction.REFILL),
        ),
        NoAction(DeficitReason.NOTHING_NEEDED),
        (),
    ),
    "a release found nothing to reserve: nothing releasable, the pool not read again": DecideCase(
        state(
            spec=RELEASING,
            ipv4=PoolCounts(20, 0),
            excess_ipv4=12,
            progress=Progress(nothing_reserved=frozenset({Family.IPV4})),
        ),
        NoAction(DeficitReason.NOTHING_RELEASABLE),
        (("release", (12, Family.IPV4, {"eni-0": 2})),),
    ),
    "an existing interface with groups by tags: nothing to read": DecideCase(
        state(spec=TAGGED, ipv4=PoolCounts(0, 0)), allocate_on(0, 1), (("allocation", (8, ())),)
    ),
}


@pytest.mark.parametrize("case", DECIDE_CASES.values(), ids=DECIDE_CASES.keys())
def test_decide(case: DecideCase) -> None:
    step = decide(case.state, case.policy)
    if isinstance(case.expected, NoAction):
        assert isinstance(step, NoAction) and step.reason == case.expected.reason, step
    else:
        assert step == case.expected
    assert tuple(case.policy.asked) == case.asked


def test_decide_with_ec2_s_policy_fills_an_empty_node_then_stops() -> None:
    """decide and Ec2Policy together, the maintainer's loop played by hand: eth0 first, then a new interface."""
    interfaces = [NetworkInterface("eth0", "02:00", 0, "node", "10.0.0.0/20", "10.0.0.10")]
    available = 0
    for _ in range(5):
        step = decide(state(interfaces=tuple(interfaces), ipv4=PoolCounts(available, 0)), EC2)
        if not isinstance(step, AllocationAction):
            break
        added = tuple(f"10.0.1.{available + n}" for n in range(step.count))
        if step.creates_interface:
            interfaces.append(
                NetworkInterface("eth1", "02:01", step.device_index, step.subnet_id, "", "10.0.2.1", added)
            )
        else:
            interfaces[0] = replace(interfaces[0], ipv4=interfaces[0].ipv4 + added)
        available += step.count
    assert step == NoAction(DeficitReason.NOTHING_NEEDED)
    assert available == 8 and len(interfaces) == 1  # 9 free slots on an m5.large's eth0: no new interface


@pytest.mark.parametrize(
    "step,moved,expected",
    [
        (allocate_on(0, 1), True, Progress(Direction.REFILL)),
        (AssignIPv6("eni-0", 4), True, Progress(Direction.REFILL)),
        (AssignIPv6("eni-0", 4), False, Progress(nothing_assigned=frozenset({Family.IPV6}))),
        (ReleaseAction("eni-0", "node", 2, Family.IPV6), True, Progress(Direction.GIVE_BACK)),
        (ReleaseAction("eni-0", "node", 2), False, Progress(nothing_reserved=frozenset({Family.IPV4}))),
        (ReadPool(), False, Progress()),
    ],
)
def test_a_step_carried_out_advances_the_progress(step: Step, moved: bool, expected: Progress) -> None:
    assert advance(Progress(), step, moved) == expected


# --- prefix delegation --------------------------------------------------------------------------

M5_NITRO = replace(M5_LARGE, prefix_capable=True)
PD = replace(SPEC, prefix_delegation=True)


def with_prefixes(interface: NetworkInterface, count: int) -> NetworkInterface:
    """`interface` holding `count` /28 prefixes besides its addresses."""
    return replace(interface, ipv4_prefixes=tuple(f"10.{interface.device_index}.{16 + n}.0/28" for n in range(count)))


def prefixes_on(device: int, count: int, subnet_id: str = "node") -> AllocationAction:
    return AllocationAction(0, subnet_id, device, interface_id=f"eth{device}", prefixes=count)


def prefixes_at(device: int, count: int, subnet_id: str = "node") -> AllocationAction:
    return AllocationAction(0, subnet_id, device, prefixes=count)


@dataclass(frozen=True)
class PrefixCase:
    counts: PoolCounts
    interfaces: tuple[NetworkInterface, ...]
    expected: Action
    watermarks: dict[str, int] = field(default_factory=dict)
    subnets: tuple[Subnet, ...] = (NODE_SUBNET,)
    limits: InstanceLimits = M5_NITRO
    no_prefix_room: frozenset[str] = frozenset()
    spec: NodeSpec = PD
    allocated: frozenset[str] = frozenset()  # of the prefixes' addresses (the others are free)


PREFIX_CASES = {
    "a deficit of 8 asks for one prefix": PrefixCase(PoolCounts(0, 0), (eni(0),), prefixes_on(0, 1)),
    "a deficit of 16 is one prefix, 17 two": PrefixCase(
        PoolCounts(0, 0), (eni(0),), prefixes_on(0, 2), watermarks={"pre_allocate": 17}
    ),
    "a deficit of 100 is capped by the 9 free slots": PrefixCase(
        PoolCounts(0, 0), (eni(0),), prefixes_on(0, 9), watermarks={"pre_allocate": 500}
    ),
    "slots taken by secondaries and prefixes are not free": PrefixCase(
        PoolCounts(19, 19), (with_prefixes(eni(0, ips=4), 1),), prefixes_on(0, 5), watermarks={"pre_allocate": 500}
    ),
    "max_allocate caps the prefixes (a whole one past it at most)": PrefixCase(
        PoolCounts(16, 16),
        (with_prefixes(eni(0), 1),),
        prefixes_on(0, 2),
        watermarks={"max_allocate": 40, "pre_allocate": 30},
    ),
    "at max_allocate: no prefix": PrefixCase(
        PoolCounts(48, 48),
        (with_prefixes(eni(0), 3),),
        NoAction(DeficitReason.MAX_ALLOCATE),
        watermarks={"max_allocate": 48},
    ),
    "a full interface of prefixes: a new one created with prefixes": PrefixCase(
        PoolCounts(144, 140), (with_prefixes(eni(0), 9),), prefixes_at(1, 1)
    ),
    "a new interface takes at most its slots but one": PrefixCase(
        PoolCounts(144, 144), (with_prefixes(eni(0), 9),), prefixes_at(1, 9), watermarks={"pre_allocate": 1000}
    ),
    "a subnet without a /28's worth of addresses takes no prefix: secondaries": PrefixCase(
        PoolCounts(0, 0),
        (eni(0),),
        allocate_on(0, 8),
        subnets=(subnet("node", 12),),
        limits=replace(M5_NITRO, max_interfaces=1),
    ),
    "no /28 in the node's subnet: a new interface with prefixes in another": PrefixCase(
        PoolCounts(0, 0),
        (eni(0),),
        prefixes_at(1, 1, "pods"),
        subnets=(NODE_SUBNET, subnet("pods", 300)),
        no_prefix_room=frozenset({"node"}),
    ),
    "no /28 anywhere: this deficit in secondaries": PrefixCase(
        PoolCounts(0, 0),
        (eni(0),),
        allocate_on(0, 8),
        subnets=(NODE_SUBNET, subnet("pods", 300)),
        no_prefix_room=frozenset({"node", "pods"}),
    ),
    "no /28 and no device slot left: secondaries on the interface with room": PrefixCase(
        PoolCounts(16, 16),
        (with_prefixes(eni(0), 1), eni(1, ips=10), eni(2, ips=10)),
        allocate_on(0, 8),
        no_prefix_room=frozenset({"node"}),
    ),
    "an interface holding secondaries and a prefix: prefixes in its free slots": PrefixCase(
        PoolCounts(20, 20), (with_prefixes(eni(0, ips=5), 1),), prefixes_on(0, 1)
    ),
    "an instance type without prefixes (c4.large): secondaries": PrefixCase(
        PoolCounts(0, 0), (eni(0),), allocate_on(0, 8), limits=InstanceLimits(3, 10)
    ),
    "prefix delegation off on a Nitro type: secondaries": PrefixCase(
        PoolCounts(0, 0), (eni(0),), allocate_on(0, 8), spec=SPEC
    ),
    "surplus secondaries go back before prefixes": PrefixCase(
        PoolCounts(32 + 6, 0),
        (with_prefixes(eni(0, ips=7, free=6), 2),),
        ReleaseAction("eth0", "node", 6),
        spec=replace(PD, release_excess=True),
    ),
    "a prefix with all 16 free goes back whole, the last first": PrefixCase(
        PoolCounts(32, 0),
        (with_prefixes(eni(0), 2),),
        ReleaseAction("eth0", "node", 16, prefix="10.0.17.0/28"),
        spec=replace(PD, release_excess=True),
    ),
    "a prefix with an address in use is kept, a wholly free one goes": PrefixCase(
        PoolCounts(32, 1),
        (with_prefixes(eni(0), 2),),
        ReleaseAction("eth0", "node", 16, prefix="10.0.16.0/28"),
        spec=replace(PD, release_excess=True),
        allocated=frozenset({"10.0.17.15"}),
    ),
    "every prefix with an address in use: none goes": PrefixCase(
        PoolCounts(32, 2),
        (with_prefixes(eni(0), 2),),
        NoAction(DeficitReason.NOTHING_RELEASABLE),
        spec=replace(PD, release_excess=True),
        allocated=frozenset({"10.0.16.0", "10.0.17.9"}),
    ),
    "fewer than 16 in excess: a free prefix stays (the pool never goes below its watermark)": PrefixCase(
        PoolCounts(32, 10),
        (with_prefixes(eni(0), 2),),
        NoAction(DeficitReason.NOTHING_RELEASABLE),
        spec=replace(PD, release_excess=True),
        allocated=frozenset(f"10.0.16.{n}" for n in range(10)),
    ),
}


@pytest.mark.parametrize("case", PREFIX_CASES.values(), ids=PREFIX_CASES.keys())
def test_plan_in_prefixes(case: PrefixCase) -> None:
    spec = replace(case.spec, watermarks=replace(case.spec.watermarks, **case.watermarks))
    free = free_of(case.interfaces) | frozenset(a for i in case.interfaces for a in i.prefix_ipv4) - case.allocated
    action = plan(
        spec,
        case.counts,
        case.interfaces,
        case.limits,
        case.subnets,
        free_ipv4=free,
        no_prefix_room=case.no_prefix_room,
    )
    if isinstance(case.expected, NoAction):
        assert isinstance(action, NoAction), action
        assert action.reason == case.expected.reason
    else:
        assert action == case.expected


def test_m5_large_in_prefixes_grows_to_432_addresses() -> None:
    """Pods arriving one by one on an m5.large in prefix mode: 3 interfaces × 9 prefixes × 16."""
    interfaces = {0: eni(0)}
    counts = PoolCounts(0, 0)
    calls = 0

    def run_worker() -> Action:
        nonlocal counts, calls
        while isinstance(
            action := plan(PD, counts, list(interfaces.values()), M5_NITRO, [NODE_SUBNET]), AllocationAction
        ):
            calls += 1
            held = interfaces.get(action.device_index, eni(action.device_index))
            interfaces[action.device_index] = with_prefixes(held, len(held.ipv4_prefixes) + action.prefixes)
            counts = replace(counts, available=counts.available + action.addresses)
        return action

    for _ in range(430):
        run_worker()
        assert counts.available > counts.used, "a pod found no free address"
        counts = replace(counts, used=counts.used + 1)
    assert counts.available == 432
    assert [len(i.ipv4_prefixes) for i in interfaces.values()] == [9, 9, 9]
    assert calls == 27  # one call per prefix when pods come one by one: 16 pods per call
    assert run_worker() == NoAction(DeficitReason.AT_CAPACITY, "432 usable addresses, all attached")


@pytest.mark.parametrize("max_above_watermark", [0, 5])
def test_prefixes_settle_at_the_watermark_and_hold_still(max_above_watermark: int) -> None:
    """For every number of pods on an m5.large in prefix mode, steps are carried out until the plan
    says nothing; the pool then keeps at least pre_allocate free, and planning again changes nothing
    (no refill that a release would undo, nor the reverse)."""
    spec = replace(
        PD, release_excess=True, watermarks=Watermarks(pre_allocate=8, max_above_watermark=max_above_watermark)
    )
    for used in range(0, 400, 7):
        interface = eni(0)
        steps = 0
        while True:
            addresses = interface.prefix_ipv4
            counts = PoolCounts(len(addresses), min(used, len(addresses)))
            free = frozenset(addresses[counts.used :])  # the pods packed into the first prefixes
            waiting = used - counts.used  # pods that found no address wait
            one_interface = replace(M5_NITRO, max_interfaces=1)
            action = plan(spec, counts, [interface], one_interface, [NODE_SUBNET], free_ipv4=free, waiting_ipv4=waiting)
            if isinstance(action, NoAction):
                break
            steps += 1
            assert steps <= 2, f"{used} pods: still moving after {steps} steps ({action})"
            if isinstance(action, AllocationAction):
                interface = with_prefixes(interface, len(interface.ipv4_prefixes) + action.prefixes)
            else:
                assert isinstance(action, ReleaseAction) and action.prefix
                interface = replace(
                    interface, ipv4_prefixes=tuple(p for p in interface.ipv4_prefixes if p != action.prefix)
                )
        available = len(interface.prefix_ipv4)
        if available < 9 * 16:  # below the interface's capacity the watermark holds
            assert available - used >= 8, f"{used} pods: {available} addresses"
        assert available - used < 8 + max_above_watermark + 16, f"{used} pods: a prefix or more above the watermark"


# --- IPv6 in prefix mode: one /80 per node ------------------------------------------------------

V6_SUBNET = "2001:db8:0:1::/64"


def dual(
    interface: NetworkInterface, *, ipv6_prefixes: tuple[str, ...] = (), ipv6_subnet: str = V6_SUBNET
) -> NetworkInterface:
    return replace(interface, subnet_ipv6_cidr=ipv6_subnet, ipv6_prefixes=ipv6_prefixes)


IPV6_PREFIX_CASES = {
    "prefix mode: one /80 on the primary interface, whatever the deficit": (
        PD,
        M5_NITRO,
        (dual(eni(0)), dual(eni(1))),
        AssignIPv6("eth0", 0, prefix=True),
    ),
    "the node holds a /80: nothing more, on any interface": (
        PD,
        M5_NITRO,
        (dual(eni(0)), dual(eni(1), ipv6_prefixes=("2001:db8:0:1:1::/80",))),
        None,
    ),
    "the primary interface left out by first_interface_index: the first usable one": (
        replace(PD, first_interface_index=1),
        M5_NITRO,
        (dual(eni(0)), dual(eni(1))),
        AssignIPv6("eth1", 0, prefix=True),
    ),
    "no usable interface yet: none (IPv4 brings one first)": (
        replace(PD, first_interface_index=1),
        M5_NITRO,
        (dual(eni(0)),),
        None,
    ),
    "the interface's subnet has no IPv6 block: no call EC2 would refuse": (
        PD,
        M5_NITRO,
        (dual(eni(0), ipv6_subnet=""),),
        None,
    ),
    "a type that takes no IPv6: none": (PD, replace(M5_NITRO, ipv6_per_interface=0), (dual(eni(0)),), None),
    "a type that takes no prefixes: addresses one by one": (
        PD,
        M5_LARGE,
        (dual(eni(0)),),
        AssignIPv6("eth0", 8),
    ),
    "prefix delegation off: addresses one by one": (SPEC, M5_NITRO, (dual(eni(0)),), AssignIPv6("eth0", 8)),
}


@pytest.mark.parametrize("case", IPV6_PREFIX_CASES.values(), ids=IPV6_PREFIX_CASES.keys())
def test_ipv6_in_prefix_mode(
    case: tuple[NodeSpec, InstanceLimits, tuple[NetworkInterface, ...], AssignIPv6 | None],
) -> None:
    spec, limits, interfaces, expected = case
    assert EC2.prepare_ipv6_allocation(spec, interfaces, limits, 8) == expected


def test_decide_assigns_the_80_before_ipv4_s_prefixes_and_then_nothing_more_for_ipv6() -> None:
    """decide and Ec2Policy on a dual-stack prefix node: the /80 first, then IPv4's prefix; once the
    pool holds the /80 (the allocator then reports no IPv6 need), IPv6 asks for nothing."""
    empty = state(
        spec=PD, limits=M5_NITRO, interfaces=(dual(eni(0)),), ipv4=PoolCounts(0, 0), ipv6_enabled=True, needed_ipv6=8
    )
    assert decide(empty, EC2) == AssignIPv6("eth0", 0, prefix=True)
    held = replace(
        empty,
        interfaces=(dual(eni(0), ipv6_prefixes=("2001:db8:0:1:1::/80",)),),
        needed_ipv6=0,
        progress=advance(Progress(), AssignIPv6("eth0", 0, prefix=True), moved=True),
    )
    assert decide(held, EC2) == prefixes_on(0, 1)
    # Callers waiting for IPv6 while the /80 is held (it never runs dry): still no IPv6 call.
    assert decide(replace(held, waiting_ipv6=3, ipv4=PoolCounts(8, 0)), EC2) == NoAction(DeficitReason.NOTHING_NEEDED)


def test_a_refill_s_waiters_not_yet_woken_are_not_asked_for_again() -> None:
    """Within one maintenance the allocator's answer to AddAddresses still counts the callers the new
    prefixes will serve: the free addresses cover them, so no second round of prefixes is asked."""
    waiting = state(spec=PD, limits=M5_NITRO, interfaces=(eni(0),), ipv4=PoolCounts(0, 0), waiting_ipv4=20)
    assert decide(waiting, EC2) == prefixes_on(0, 2)  # ⌈(20 + 8) / 16⌉
    after = replace(waiting, interfaces=(with_prefixes(eni(0), 2),), ipv4=PoolCounts(32, 0))
    assert isinstance(decide(after, EC2), NoAction)
