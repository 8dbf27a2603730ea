"""The cloud-provider interface of the worker (Cilium's NodeOperations / AllocationImplementation).

A provider is two things. Its `CloudPolicy` half holds the cloud's choices, pure and without I/O
(which interface gets the addresses, which subnet, device index and security groups a new one
gets, how many a new interface takes besides its primary address, where excess is given back):
the planner asks it as Cilium's node loop asks `PrepareIPAllocation` / `PrepareIPRelease`. Its
calls are synchronous and blocking; the worker calls them from asyncio through
`asyncio.to_thread`. Every call returns what the cloud holds after it, and raises only
`providers.errors.ProviderError` subclasses.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from services.cloudworker.model import (
    AddressChange,
    AllocationAction,
    AssignIPv6,
    Instance,
    InstanceLimits,
    NetworkInterface,
    NoAction,
    NodeSpec,
    ReleaseAction,
    SecurityGroup,
    Subnet,
)
from services.core.family import Family


class CloudPolicy(Protocol):
    """The cloud's choices for one step (pure: no I/O, no state)."""

    def node_instance(self, node: str, instance_id: str, instance_type: str) -> tuple[str, str] | None:
        """The instance that holds node `node`'s addresses, as (id, type), from the instance id and
        type its spec names; None when they name none this cloud can use (the node waits,
        `no-instance`)."""
        ...

    def prepare_allocation(
        self,
        spec: NodeSpec,
        wanted: int,
        interfaces: Sequence[NetworkInterface],
        limits: InstanceLimits,
        subnets: Sequence[Subnet],
        tagged_security_groups: Sequence[str] = (),
        no_prefix_room: Collection[str] = (),
    ) -> AllocationAction | NoAction:
        """Where up to `wanted` more IPv4 addresses go: an existing interface with room, else a new
        interface (subnet, device index, security groups, how many addresses), else why none.
        `tagged_security_groups`: the groups carrying the spec's tags, when it names some.
        With `spec.prefix_delegation` on a type that takes them, the addresses come as prefixes,
        except in the subnets of `no_prefix_room` (no free /28 lately)."""
        ...

    def prepare_release(
        self,
        spec: NodeSpec,
        interfaces: Sequence[NetworkInterface],
        free: Collection[str],
        excess: int,
        family: Family,
    ) -> ReleaseAction | NoAction:
        """Which interface gives back how many of the `excess` addresses of `family`; `free`: the
        pool's free addresses (only those can be given back)."""
        ...

    def prepare_ipv6_allocation(
        self, spec: NodeSpec, interfaces: Sequence[NetworkInterface], limits: InstanceLimits, wanted: int
    ) -> AssignIPv6 | None:
        """Which interface gets up to `wanted` IPv6 addresses; None when none has room."""
        ...


class CloudProvider(CloudPolicy, Protocol):
    """What the worker needs from a cloud: its choices (`CloudPolicy`) and its calls."""

    def instance_limits(self, instance_type: str) -> InstanceLimits:
        """Interfaces and addresses per interface of an instance type; raises `NotFound` if unknown."""
        ...

    def describe_instance(self, instance_id: str) -> Instance:
        """Zone, VPC, primary subnet and security groups of an instance."""
        ...

    def describe_instances(self, instance_ids: Sequence[str]) -> list[Instance]:
        """Several instances in one call; ids the cloud does not know are left out."""
        ...

    def list_vpc_interfaces(self, vpc_id: str) -> list[tuple[str, NetworkInterface]]:
        """Every attached interface of a VPC, with the id of its instance (paginated)."""
        ...

    def list_subnets(self, vpc_id: str, availability_zone: str = "") -> list[Subnet]:
        """Subnets of a VPC (of one zone when given), with their free address counts."""
        ...

    def list_security_groups(self, vpc_id: str) -> list[SecurityGroup]:
        """Security groups of a VPC, with their tags."""
        ...

    def list_interfaces(self, instance_id: str) -> list[NetworkInterface]:
        """Interfaces attached to an instance, by device index."""
        ...

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
        """Create an interface holding `ipv4_count` secondary addresses or `ipv4_prefix_count` /28
        prefixes, tagged as ours, attach it at `device_index` and set DeleteOnTermination. If the
        attach fails it is deleted again."""
        ...

    def assign_prefixes(self, interface_id: str, count: int, *, known: NetworkInterface | None = None) -> AddressChange:
        """Assign `count` IPv4 /28 prefixes, all or none (`NoPrefixRoom` when the subnet has no
        free aligned /28); returns the new prefixes, their addresses and the interface."""
        ...

    def assign_ipv6_prefix(self, interface_id: str, *, known: NetworkInterface | None = None) -> AddressChange:
        """Assign one IPv6 /80 prefix; returns it (in `prefixes`; none when the interface read back
        holds nothing new) and the interface. Its addresses are never listed one by one."""
        ...

    def unassign_prefixes(
        self, interface_id: str, prefixes: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        """Unassign these IPv4 prefixes; returns those really gone, their addresses and the interface."""
        ...

    def assign_addresses(
        self, interface_id: str, count: int, family: Family = Family.IPV4, *, known: NetworkInterface | None = None
    ) -> AddressChange:
        """Assign `count` more addresses of `family`; returns the new ones and the interface.
        `known`: the interface as last read, when the caller holds it (spares a read)."""
        ...

    def unassign_addresses(
        self, interface_id: str, ips: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        """Unassign these addresses (either family); returns those really gone and the interface.
        `known`: the interface as last read (the answer then updates it: no read-back)."""
        ...

    def conflicting_addresses(self, interface: NetworkInterface, ips: Sequence[str]) -> set[str]:
        """Of `ips`, just given to `interface`, those the subnet reserves or another interface holds.
        A real VPC never hands these out; checking costs one read and guards the pools' uniqueness
        against a cloud that does (the local EC2 picks addresses at random)."""
        ...

    def list_leaked_interfaces(
        self, older_than_seconds: float, node_instances: Collection[str] | None = None
    ) -> list[NetworkInterface]:
        """Interfaces we created for this cluster that are detached (`available`) and older than
        the grace period, so not merely created and not yet attached; or, in a cloud whose
        interfaces are never detached, those held by no instance of `node_instances` (the nodes'
        instances, read just before; None: unknown, and then none of those)."""
        ...

    def delete_interface(self, interface_id: str) -> bool:
        """Delete a detached interface; False if it was already gone."""
        ...

    def vpc_cidrs(self, vpc_id: str) -> list[str]:
        """The CIDR blocks associated with a VPC (both families)."""
        ...
