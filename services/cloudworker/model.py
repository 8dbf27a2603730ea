"""What the cloud holds: value types shared by the planner and the cloud providers (no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.core.pool_math import interface_capacity


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    """Per-instance-type network limits (DescribeInstanceTypes). IPv4 counts include the primary."""

    max_interfaces: int
    ipv4_per_interface: int
    ipv6_per_interface: int = 0

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

    @property
    def ipv4_count(self) -> int:
        """IPv4 addresses on the interface, primary included (what the per-interface limit counts)."""
        return len(self.ipv4) + (1 if self.primary_ip else 0)

    @property
    def gateway_ip(self) -> str:
        """The subnet's router: the first host address of its CIDR, as in a VPC."""
        if not self.subnet_cidr:
            return ""
        return str(ipaddress.ip_network(self.subnet_cidr, strict=False).network_address + 1)


@dataclass(frozen=True, slots=True)
class AddressChange:
    """The outcome of an assign or unassign: the addresses that changed, and the interface read back."""

    addresses: tuple[str, ...]
    interface: NetworkInterface
