"""The node maintainer against fakes behind its two seams (`CloudProvider` and `AllocatorClient`),
as Cilium tests its node loop against a mock allocation implementation: what a maintenance leaves
in the cloud and in the pool, not how it gets there. The integration tests run it against moto and
a real allocator."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry

from services.cloudworker.allocator_client import NodeConfig, PoolAddresses, PoolNode, PoolStats, Reservation
from services.cloudworker.maintainer import NodeMaintainer, Outcome, planner_spec
from services.cloudworker.metrics import WorkerMetrics
from services.cloudworker.model import (
    AddressChange,
    Instance,
    InstanceLimits,
    NetworkInterface,
    SecurityGroup,
    Subnet,
)
from services.cloudworker.providers.aws import Ec2Policy
from services.cloudworker.providers.errors import NotFound
from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks, pool_excess_ips, pool_needed_ips
from services.core.reasons import DeficitReason

SUBNET = Subnet("subnet-1", "vpc-1", "az-1", "10.1.0.0/24", free_addresses=200)
INSTANCE = Instance("i-1", "small", "az-1", "vpc-1", SUBNET.id, security_group_ids=("sg-1",))
LIMITS = InstanceLimits(max_interfaces=3, ipv4_per_interface=5)
MUTATING = ("create_interface", "assign_addresses", "unassign_addresses", "delete_interface")


@dataclass
class FakeCloud(Ec2Policy):
    """One instance in one subnet, with EC2's choices; addresses handed out in order; records every
    call by name."""

    known_types: tuple[str, ...] = ("small",)
    hand_out_twice: set[str] = field(default_factory=set)  # what conflicting_addresses reports (once)
    interfaces: dict[str, NetworkInterface] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    _next_host: int = 10

    def __post_init__(self) -> None:
        primary = NetworkInterface("eni-0", "02:00:00:00:00:00", 0, SUBNET.id, SUBNET.cidr, self._address())
        self.interfaces[primary.id] = primary

    def _address(self) -> str:
        self._next_host += 1
        return str(ipaddress.ip_network(SUBNET.cidr)[self._next_host])

    def held(self) -> set[str]:
        return {ip for i in self.interfaces.values() for ip in i.ipv4}

    def instance_limits(self, instance_type: str) -> InstanceLimits:
        self.calls.append("instance_limits")
        if instance_type not in self.known_types:
            raise NotFound(f"instance type {instance_type} unknown", code="InvalidInstanceType", operation="x")
        return LIMITS

    def describe_instance(self, instance_id: str) -> Instance:
        self.calls.append("describe_instance")
        return INSTANCE

    def describe_instances(self, instance_ids: Sequence[str]) -> list[Instance]:
        self.calls.append("describe_instances")
        return [INSTANCE] if INSTANCE.id in instance_ids else []

    def list_vpc_interfaces(self, vpc_id: str) -> list[tuple[str, NetworkInterface]]:
        self.calls.append("list_vpc_interfaces")
        return [(INSTANCE.id, i) for i in self.interfaces.values() if i.device_index >= 0]

    def list_subnets(self, vpc_id: str, availability_zone: str = "") -> list[Subnet]:
        self.calls.append("list_subnets")
        return [SUBNET]

    def list_security_groups(self, vpc_id: str) -> list[SecurityGroup]:
        self.calls.append("list_security_groups")
        return [SecurityGroup("sg-1", "vpc-1")]

    def list_interfaces(self, instance_id: str) -> list[NetworkInterface]:
        self.calls.append("list_interfaces")
        return sorted(self.interfaces.values(), key=lambda i: i.device_index)

    def create_interface(
        self,
        *,
        instance_id: str,
        node: str,
        subnet_id: str,
        security_group_ids: Sequence[str],
        device_index: int,
        ipv4_count: int,
        ipv4_prefix_count: int = 0,
    ) -> NetworkInterface:
        self.calls.append("create_interface")
        interface = NetworkInterface(
            f"eni-{device_index}",
            f"02:00:00:00:00:0{device_index}",
            device_index,
            subnet_id,
            SUBNET.cidr,
            self._address(),
            ipv4=tuple(self._address() for _ in range(ipv4_count)),
            security_group_ids=tuple(security_group_ids),
        )
        self.interfaces[interface.id] = interface
        return interface

    def assign_addresses(
        self, interface_id: str, count: int, family: Family = Family.IPV4, *, known: NetworkInterface | None = None
    ) -> AddressChange:
        self.calls.append("assign_addresses")
        added = tuple(self._address() for _ in range(count))
        interface = self.interfaces[interface_id]
        interface = self.interfaces[interface_id] = replace(interface, ipv4=interface.ipv4 + added)
        return AddressChange(added, interface)

    def unassign_addresses(
        self, interface_id: str, ips: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        self.calls.append("unassign_addresses")
        interface = self.interfaces[interface_id]
        gone = tuple(ip for ip in interface.ipv4 if ip in ips)
        interface = self.interfaces[interface_id] = replace(
            interface, ipv4=tuple(ip for ip in interface.ipv4 if ip not in ips)
        )
        return AddressChange(gone, interface)

    def conflicting_addresses(self, interface: NetworkInterface, ips: Sequence[str]) -> set[str]:
        self.calls.append("conflicting_addresses")
        found = {ip for ip in ips if ip in self.hand_out_twice}
        self.hand_out_twice -= found
        return found

    def list_leaked_interfaces(
        self, older_than_seconds: float, node_instances: Collection[str] | None = None
    ) -> list[NetworkInterface]:
        return []

    def delete_interface(self, interface_id: str) -> bool:
        self.calls.append("delete_interface")
        return self.interfaces.pop(interface_id, None) is not None

    def vpc_cidrs(self, vpc_id: str) -> list[str]:
        self.calls.append("vpc_cidrs")
        return ["10.1.0.0/16"]


@dataclass
class FakeAllocator:
    """One node's default pool: attached addresses, the allocated ones, its interface table."""

    spec: NodeConfig
    attached: set[str] = field(default_factory=set)
    allocated: set[str] = field(default_factory=set)
    interfaces: dict[str, NetworkInterface] = field(default_factory=dict)
    deficit_reason: str = ""
    last_error: str = ""
    limits: InstanceLimits = field(default_factory=lambda: InstanceLimits(0, 0))
    vpc_cidrs: tuple[str, ...] = ()
    during_release: Callable[[], None] = lambda: None  # what happens while the cloud unassigns

    def node(self) -> PoolNode:
        counts = PoolCounts(len(self.attached), len(self.allocated), 0)
        return PoolNode(
            config=self.spec,
            interfaces=tuple(self.interfaces.values()),
            stats=PoolStats(
                ipv4=counts,
                needed_ipv4=pool_needed_ips(counts, self.spec.watermarks),
                excess_ipv4=pool_excess_ips(counts, self.spec.watermarks),
                deficit_reason=self.deficit_reason,
            ),
            limits=self.limits,
            vpc_cidrs=self.vpc_cidrs,
        )

    async def get_node(self, name: str) -> PoolNode:
        return self.node()

    async def list_nodes(self, *, order_by_watermark: bool = False) -> list[PoolNode]:
        return [self.node()]

    async def dump(self, node: str) -> PoolAddresses:
        return PoolAddresses(
            allocated_ipv4=frozenset(self.allocated), free_ipv4=frozenset(self.attached - self.allocated)
        )

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
        self.attached.update(ips)
        self.interfaces[interface.id] = interface
        self.vpc_cidrs = tuple(vpc_cidrs) or self.vpc_cidrs
        if limits is not None:
            self.limits = limits
        return self.node()

    async def set_interfaces(
        self,
        node: str,
        interfaces: Sequence[NetworkInterface],
        *,
        vpc_cidrs: Sequence[str],
        limits: InstanceLimits,
        deficit_reason: str,
    ) -> None:
        self.interfaces = {i.id: i for i in interfaces}
        self.deficit_reason = deficit_reason
        self.limits = limits

    async def set_node_error(self, node: str, error: str) -> None:
        self.last_error = error

    async def remove_addresses(
        self, node: str, ips: Sequence[str], *, prefixes: Sequence[str] = (), ipv6_prefix: str = ""
    ) -> list[str]:
        self.attached.difference_update(ip for ip in ips if ip not in self.allocated)
        return []

    async def reserve_for_release(
        self, node: str, interface_id: str, count: int, family: Family, *, prefix: str = ""
    ) -> Reservation:
        held = self.interfaces[interface_id].addresses(family)
        free = [ip for ip in held if ip in self.attached and ip not in self.allocated]
        return Reservation("r-1", tuple(free[:count]))

    async def complete_release(self, node: str, reservation_id: str, ips: Sequence[str]) -> list[str]:
        self.attached.difference_update(ips)
        self.during_release()
        return list(ips)

    async def abort_release(self, node: str, reservation_id: str) -> None:
        pass

    async def close(self) -> None:
        pass


def _spec(**fields: object) -> NodeConfig:
    defaults: dict[str, object] = dict(
        name="node-a",
        instance_id=INSTANCE.id,
        instance_type=INSTANCE.instance_type,
        subnet_ids=(SUBNET.id,),
        watermarks=Watermarks(pre_allocate=int(fields.pop("pre_allocate", 4))),  # type: ignore[call-overload]
    )
    return NodeConfig(**{**defaults, **fields})  # type: ignore[arg-type]


def _maintain(cloud: FakeCloud, allocator: FakeAllocator, maintainer: NodeMaintainer | None = None) -> Outcome:
    maintainer = maintainer or NodeMaintainer(
        cloud, allocator, WorkerMetrics(CollectorRegistry()), stale_reservation_seconds=60
    )
    return asyncio.run(maintainer.maintain(allocator.spec.name))


def test_an_empty_pool_is_filled_to_its_watermark_with_what_the_cloud_assigned() -> None:
    cloud, allocator = FakeCloud(), FakeAllocator(_spec())
    outcome = _maintain(cloud, allocator)
    assert outcome.assigned >= 4 and outcome.reason == DeficitReason.NOTHING_NEEDED
    assert allocator.node().stats.needed_ipv4 == 0
    assert allocator.attached == cloud.held()  # the pool holds exactly what the cloud assigned


def test_a_new_interface_is_created_when_the_attached_ones_are_full() -> None:
    cloud, allocator = FakeCloud(), FakeAllocator(_spec(pre_allocate=8))  # eni-0 takes 4 secondaries
    outcome = _maintain(cloud, allocator)
    assert outcome.interfaces_created == 1 and allocator.node().stats.needed_ipv4 == 0
    assert allocator.attached == cloud.held() and set(allocator.interfaces) == set(cloud.interfaces)


def test_a_pool_at_its_watermark_costs_no_mutating_cloud_call() -> None:
    cloud, allocator = FakeCloud(), FakeAllocator(_spec())
    metrics = WorkerMetrics(CollectorRegistry())
    maintainer = NodeMaintainer(cloud, allocator, metrics, stale_reservation_seconds=60)
    _maintain(cloud, allocator, maintainer)
    cloud.calls.clear()
    again = _maintain(cloud, allocator, maintainer)
    assert (again.assigned, again.actions) == (0, [])
    assert not [c for c in cloud.calls if c in MUTATING]


def test_addresses_the_cloud_handed_out_twice_are_given_back_and_counted() -> None:
    cloud, allocator = FakeCloud(), FakeAllocator(_spec())
    cloud.hand_out_twice = {"10.1.0.12"}  # the first secondary address the fake hands out
    registry = CollectorRegistry()
    maintainer = NodeMaintainer(cloud, allocator, WorkerMetrics(registry), stale_reservation_seconds=60)
    _maintain(cloud, allocator, maintainer)
    assert "10.1.0.12" not in allocator.attached and "10.1.0.12" not in cloud.held()
    assert allocator.node().stats.needed_ipv4 == 0  # refilled with others
    assert registry.get_sample_value("ipam_worker_conflict_give_backs_total") == 1
    assert registry.get_sample_value("ipam_worker_conflicting_addresses_total") == 1


def test_an_unknown_instance_type_is_told_to_the_allocator_as_the_deficit_reason() -> None:
    cloud, allocator = FakeCloud(known_types=()), FakeAllocator(_spec())
    outcome = _maintain(cloud, allocator)
    assert outcome.reason == DeficitReason.INSTANCE_TYPE_UNKNOWN
    assert allocator.deficit_reason == DeficitReason.INSTANCE_TYPE_UNKNOWN
    assert allocator.last_error.startswith(DeficitReason.INSTANCE_TYPE_UNKNOWN)
    assert not [c for c in cloud.calls if c in MUTATING] and allocator.attached == set()


def test_a_node_without_an_instance_is_left_alone() -> None:
    cloud, allocator = FakeCloud(), FakeAllocator(_spec(instance_id=""))
    outcome = _maintain(cloud, allocator)
    assert outcome.reason == DeficitReason.NO_INSTANCE
    assert cloud.calls == [] and allocator.attached == set()


@dataclass
class InstanceFreeCloud(FakeCloud):
    """A cloud whose node is its own instance (as the cluster pool's): the spec names none."""

    instance_ids: list[str] = field(default_factory=list)

    def node_instance(self, node: str, instance_id: str, instance_type: str) -> tuple[str, str] | None:
        return (instance_id or node, instance_type or "small")

    def describe_instance(self, instance_id: str) -> Instance:
        self.instance_ids.append(instance_id)
        return super().describe_instance(instance_id)


def test_the_provider_says_which_instance_holds_a_node_s_addresses() -> None:
    cloud, allocator = InstanceFreeCloud(), FakeAllocator(_spec(instance_id="", instance_type=""))
    outcome = _maintain(cloud, allocator)
    assert outcome.reason == DeficitReason.NOTHING_NEEDED and allocator.attached == cloud.held() != set()
    assert set(cloud.instance_ids) == {"node-a"}


def test_a_spec_s_prefix_delegation_wins_over_the_worker_s_default() -> None:
    instance = Instance("i-1", "m5.large", "us-east-1a", "vpc-1", "subnet-1")
    for spec, default, expected in [
        (None, True, True),
        (None, False, False),
        (False, True, False),
        (True, False, True),
    ]:
        config = NodeConfig("n", prefix_delegation=spec)
        assert planner_spec(config, instance, prefix_delegation=default).prefix_delegation is expected


def test_a_maintenance_that_gave_back_leaves_a_deficit_since_to_the_next_one() -> None:
    """Refill or give back, never both: pods that took addresses while the excess went back leave a
    deficit that the next maintenance (their own event) refills, not an assign right after the
    release on the same node."""
    cloud, allocator = FakeCloud(), FakeAllocator(_spec(pre_allocate=8))
    maintainer = NodeMaintainer(cloud, allocator, WorkerMetrics(CollectorRegistry()), stale_reservation_seconds=60)
    _maintain(cloud, allocator, maintainer)  # 8 addresses on eni-0 and a new eni-1
    allocator.spec = replace(_spec(pre_allocate=2), release_excess=True)  # 6 in excess

    def pods_arrive() -> None:
        allocator.allocated.update(sorted(allocator.attached)[:3])

    allocator.during_release = pods_arrive
    cloud.calls.clear()
    outcome = _maintain(cloud, allocator, maintainer)
    assert outcome.assigned == 0 and "assign_addresses" not in cloud.calls  # no refill in this one
    assert outcome.released == 4 and outcome.reason == DeficitReason.OTHER_WAY_NEXT
    assert allocator.node().stats.needed_ipv4 > 0  # left for the next maintenance
    again = _maintain(cloud, allocator, maintainer)
    assert again.assigned > 0 and again.released == 0 and allocator.node().stats.needed_ipv4 == 0
