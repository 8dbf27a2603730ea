"""What the cloud holds and what a step does to it: value types shared by the planner and the
cloud providers (no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from services.core.family import Family
from services.core.pool_math import Watermarks, interface_capacity
from services.core.prefixes import ADDRESSES_PER_PREFIX
from services.core.reasons import DeficitReason


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    """Per-instance-type network limits (DescribeInstanceTypes). IPv4 counts include the primary."""

    max_interfaces: int
    ipv4_per_interface: int
    ipv6_per_interface: int = 0
    prefix_capable: bool = False  # takes IPv4 /28 prefixes (Nitro or bare metal)

    def capacity(self, first_interface_index: int = 0) -> int:
        """Usable IPv4 addresses of the instance (primaries and interfaces below the first index excluded)."""
        return interface_capacity(self.max_interfaces, self.ipv4_per_interface, first_interface_index)


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance as the cloud describes it."""

    id: str
    instance_type: str
    availability_zone: str
    vpc_id: str
    subnet_id: str  # subnet of the primary interface (device 0)
    security_group_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Subnet:
    """A subnet and how many addresses it still has free."""

    id: str
    vpc_id: str
    availability_zone: str
    cidr: str
    free_addresses: int
    tags: Mapping[str, str] = field(default_factory=dict)
    ipv6_cidr: str = ""  # "" = the subnet has no IPv6 block


@dataclass(frozen=True, slots=True)
class SecurityGroup:
    """A security group and its tags (to pick groups for new interfaces by tags)."""

    id: str
    vpc_id: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NetworkInterface:
    """A network interface as the cloud holds it (read back after every change)."""

    id: str
    mac: str
    device_index: int  # -1 when not attached
    subnet_id: str
    subnet_cidr: str
    primary_ip: str
    ipv4: tuple[str, ...] = ()  # secondary IPv4 addresses, primary excluded
    ipv6: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    status: str = ""  # "in-use", "available", ...
    tags: Mapping[str, str] = field(default_factory=dict)
    subnet_ipv6_cidr: str = ""  # "" = the subnet has no IPv6 block
    gateway_ipv6: str = ""  # the IPv6 router as the interface reaches it (the cloud's, not derived)
    ipv4_prefixes: tuple[str, ...] = ()  # delegated /28 prefixes, each one slot of 16 addresses
    ipv6_prefixes: tuple[str, ...] = ()  # delegated IPv6 /80 prefixes (one per node in prefix mode)

    def addresses(self, family: Family) -> tuple[str, ...]:
        """Its secondary addresses of `family` (IPv4: the /32s, prefixes excluded)."""
        return self.ipv6 if family is Family.IPV6 else self.ipv4

    @property
    def prefix_ipv4(self) -> tuple[str, ...]:
        """Every address of its IPv4 prefixes."""
        return prefixes_addresses(self.ipv4_prefixes)

    @property
    def pool_ipv4(self) -> tuple[str, ...]:
        """The IPv4 addresses it brings to the pool: its /32 secondaries and its prefixes' addresses."""
        return (*self.ipv4, *self.prefix_ipv4)

    def free_count(self, family: Family, free: Collection[str]) -> int:
        """How many of its addresses of `family` are among `free` (the pool's free ones)."""
        return sum(1 for a in self.addresses(family) if a in free)

    def whole_prefixes(self, addresses: Collection[str]) -> list[str]:
        """Its IPv4 prefixes whose 16 addresses are all among `addresses` (e.g. the pool's free ones:
        the prefixes that may go back whole)."""
        return [p for p in self.ipv4_prefixes if all(a in addresses for a in prefix_addresses(p))]

    @property
    def ipv4_count(self) -> int:
        """IPv4 slots taken on the interface: primary, secondaries and prefixes (what the
        per-interface limit counts)."""
        return len(self.ipv4) + len(self.ipv4_prefixes) + (1 if self.primary_ip else 0)

    @property
    def gateway_ip(self) -> str:
        """The subnet's IPv4 router: the first host address of its CIDR, as in a VPC."""
        if not self.subnet_cidr:
            return ""
        return str(ipaddress.ip_network(self.subnet_cidr, strict=False).network_address + 1)


def usable_interfaces(interfaces: Iterable[NetworkInterface], first_index: int) -> list[NetworkInterface]:
    """The interfaces a node's pool may use (device index `first_index` and up), lowest first."""
    return sorted((i for i in interfaces if i.device_index >= first_index), key=lambda i: i.device_index)


def prefix_addresses(prefix: str) -> tuple[str, ...]:
    """The 16 addresses of an IPv4 /28 prefix, all of them usable (the subnet's reserved addresses
    never fall in a delegated prefix)."""
    network = ipaddress.ip_network(prefix, strict=False)
    return tuple(str(network.network_address + i) for i in range(min(network.num_addresses, ADDRESSES_PER_PREFIX)))


def prefixes_addresses(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The addresses of IPv4 /28 prefixes, prefix after prefix."""
    return tuple(a for p in prefixes for a in prefix_addresses(p))


@dataclass(frozen=True, slots=True)
class AddressChange:
    """The outcome of an assign or unassign: the addresses that changed (a prefix's expanded), the
    prefixes that changed, and the interface read back."""

    addresses: tuple[str, ...]
    interface: NetworkInterface
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What planning needs of a node's spec (the proto `NodeSpec`, minus names and ids)."""

    watermarks: Watermarks = field(default_factory=Watermarks)
    first_interface_index: int = 0
    subnet_ids: tuple[str, ...] = ()
    subnet_tags: Mapping[str, str] = field(default_factory=dict)
    security_group_ids: tuple[str, ...] = ()  # the spec's, else the instance's
    # Groups carrying these tags go before `security_group_ids` (set only when the spec names no ids).
    security_group_tags: Mapping[str, str] = field(default_factory=dict)
    vpc_id: str = ""  # "" = do not filter subnets by VPC
    availability_zone: str = ""  # "" = do not filter subnets by zone
    release_excess: bool = False
    # IPv4 comes in /28 prefixes where the instance type takes them (secondaries where it cannot).
    prefix_delegation: bool = False


@dataclass(frozen=True, slots=True)
class AllocationAction:
    """Add `count` secondary IPv4 addresses, or `prefixes` /28 prefixes (16 addresses each) when
    that is set (`count` is then 0).

    With `interface_id` set: assign them on that existing interface. With `interface_id` empty:
    create an interface in `subnet_id` with `security_group_ids`, holding them, and attach it at
    `device_index`.
    """

    count: int
    subnet_id: str
    device_index: int
    interface_id: str = ""
    security_group_ids: tuple[str, ...] = ()
    prefixes: int = 0

    @property
    def addresses(self) -> int:
        """The addresses the action brings to the pool."""
        return self.prefixes * ADDRESSES_PER_PREFIX if self.prefixes else self.count

    @property
    def creates_interface(self) -> bool:
        """True when the action creates a new interface."""
        return not self.interface_id


@dataclass(frozen=True, slots=True)
class ReleaseAction:
    """Give `count` free addresses of `family` of interface `interface_id` back to the cloud; with
    `prefix` set, that IPv4 /28 whole (its 16 addresses)."""

    interface_id: str
    subnet_id: str
    count: int
    family: Family = Family.IPV4
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class NoAction:
    """Nothing to do now, and why; `detail` is for humans."""

    reason: DeficitReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AssignIPv6:
    """Assign `count` IPv6 addresses on the existing interface `interface_id`, or with `prefix` set
    one IPv6 /80 prefix instead (`count` is then 0): the node's IPv6 for as long as it lives."""

    interface_id: str
    count: int
    prefix: bool = False


Action = AllocationAction | ReleaseAction | NoAction
