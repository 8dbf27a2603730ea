"""How the local EC2 hands out addresses and prefixes, installed into moto's EC2 by `install()`.

moto keeps no address map of a subnet: it draws secondary addresses at random (two interfaces may
get the same one), ignores prefix requests and per-interface limits. Installed, the local EC2 keeps
one map per subnet CIDR (`SubnetSpace`, built from what the subnet's interfaces hold at each
request) and behaves as EC2 does:

- automatic single addresses never collide with anything, never land in a delegated prefix, a CIDR
  reservation or an address EC2 reserves; a named one must be free;
- `Ipv4PrefixCount` / `Ipv4Prefixes` on `AssignPrivateIpAddresses` and `CreateNetworkInterface`,
  `Ipv6PrefixCount` / `Ipv6Prefixes` on `AssignIpv6Addresses`, and their unassignment: aligned
  /28s (/80s) wholly free, the lowest first, inside `prefix` reservations first;
- each prefix takes one of the interface's address slots (its instance type's
  Ipv4AddressesPerInterface): `PrivateIpAddressLimitExceeded` beyond;
- a request is carried out whole or not at all: `InsufficientCidrBlocks` (or, as configured, the
  `InvalidParameterValue` variant EC2 also answers) when too few blocks are free;
- prefixes only on Nitro (or bare-metal) instance types; assign answers list only what is new;
  `AvailableIpAddressCount` counts 16 addresses per prefix.

Choices are deterministic given moto's seeded random generator, so a replayed recording hands out
the same addresses and prefixes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.core.responses import ActionResult, EmptyResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.elastic_network_interfaces import NetworkInterface
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.models.subnets import Subnet
from moto.ec2.responses import EC2Response
from moto.ec2.utils import add_tag_specification, random_private_ip

from dev.ec2 import CAPACITY_ERRORS
from dev.ec2.subnet_space import Network, SubnetSpace

_CAPACITY_MESSAGES = {
    "InsufficientCidrBlocks": "The specified subnet does not have enough free cidr blocks to satisfy the request.",
    "InvalidParameterValue": "There aren't sufficient free Ipv4 addresses or prefixes",
}
# The attribute names moto's serializer reads for an interface's Ipv4Prefixes and Ipv6Prefixes.
_PREFIX_ATTRIBUTES = {4: ("ipv4_prefixes", "Ipv4Prefix"), 6: ("ipv6_prefixes", "Ipv6Prefix")}


@dataclass
class _Settings:
    capacity_error: str = CAPACITY_ERRORS[0]
    installed: bool = False


_settings = _Settings()


def set_capacity_error(code: str) -> None:
    """The code answered from now on when too few prefixes are free (one of `CAPACITY_ERRORS`)."""
    if code not in CAPACITY_ERRORS:
        raise ValueError(f"the prefix capacity error must be one of {', '.join(CAPACITY_ERRORS)}, not {code!r}")
    _settings.capacity_error = code


def install(capacity_error: str = CAPACITY_ERRORS[0]) -> None:
    """Teach this process's moto EC2 the address map and prefix delegation, answering
    `capacity_error` when too few prefixes are free."""
    set_capacity_error(capacity_error)
    if _settings.installed:
        return
    Subnet.get_available_subnet_ip = _instance_primary_address  # type: ignore[method-assign]
    Subnet.available_ip_address_count = property(_available_ip_address_count)  # type: ignore[assignment,method-assign]
    EC2Response.create_network_interface = _create_network_interface  # type: ignore[method-assign]
    EC2Response.assign_private_ip_addresses = _assign_private_ip_addresses  # type: ignore[method-assign]
    EC2Response.unassign_private_ip_addresses = _unassign_private_ip_addresses  # type: ignore[method-assign]
    EC2Response.assign_ipv6_addresses = _assign_ipv6_addresses  # type: ignore[method-assign]
    EC2Response.unassign_ipv6_addresses = _unassign_ipv6_addresses  # type: ignore[method-assign]
    _settings.installed = True


# The subnet's address map.


def ipv4_space(subnet: Subnet) -> SubnetSpace:
    """The subnet's IPv4 CIDR as its interfaces hold it now."""
    interfaces = _interfaces(subnet)
    addresses = [a["PrivateIpAddress"] for e in interfaces for a in e.private_ip_addresses]
    return _space(subnet, subnet.cidr, interfaces, addresses)


def ipv6_space(subnet: Subnet) -> SubnetSpace:
    """The subnet's IPv6 CIDR as its interfaces hold it now (InvalidParameterValue if it has none)."""
    cidrs = [a["ipv6CidrBlock"] for a in subnet.ipv6_cidr_block_associations.values()]
    if not cidrs:
        raise EC2ClientError("InvalidParameterValue", f"Subnet {subnet.id} has no IPv6 CIDR block")
    interfaces = _interfaces(subnet)
    addresses = [a for e in interfaces for a in e.ipv6_addresses]
    return _space(subnet, ipaddress.IPv6Network(cidrs[0]), interfaces, addresses)


def _space(subnet: Subnet, cidr: Network, interfaces: list[NetworkInterface], addresses: list[str]) -> SubnetSpace:
    reservations = [r for r in subnet._cidr_reservations if r.cidr.version == cidr.version]
    return SubnetSpace(
        cidr=cidr,
        addresses=frozenset(int(ipaddress.ip_address(a)) for a in addresses),
        prefixes=frozenset(p for e in interfaces for p in prefixes_of(e, cidr.version)),
        prefix_reservations=tuple(r.cidr for r in reservations if r.reservation_type == "prefix"),
        explicit_reservations=tuple(r.cidr for r in reservations if r.reservation_type == "explicit"),
    )


def _available_ip_address_count(subnet: Subnet) -> int:
    """DescribeSubnets' AvailableIpAddressCount: 16 fewer for each prefix."""
    return ipv4_space(subnet).available_count()


def _interfaces(subnet: Subnet) -> list[NetworkInterface]:
    return [e for e in subnet.ec2_backend.enis.values() if e.subnet.id == subnet.id]


def prefixes_of(interface: NetworkInterface, version: int) -> list[Network]:
    """The prefixes of one family delegated to `interface`, in the order they were assigned."""
    attribute, key = _PREFIX_ATTRIBUTES[version]
    return [ipaddress.ip_network(p[key]) for p in getattr(interface, attribute, [])]


def _add_prefixes(interface: NetworkInterface, version: int, prefixes: list[Network]) -> None:
    attribute, key = _PREFIX_ATTRIBUTES[version]
    setattr(interface, attribute, [*getattr(interface, attribute, []), *({key: str(p)} for p in prefixes)])


def _remove_prefixes(interface: NetworkInterface, version: int, prefixes: set[Network]) -> None:
    attribute, key = _PREFIX_ATTRIBUTES[version]
    kept = [p for p in getattr(interface, attribute, []) if ipaddress.ip_network(p[key]) not in prefixes]
    setattr(interface, attribute, kept)


# Choosing addresses and prefixes.


def _draw(space: SubnetSpace) -> Callable[[], int]:
    """A random address of the space's CIDR from moto's seeded generator."""
    return lambda: int(ipaddress.ip_address(random_private_ip(str(space.cidr), ipv6=space.cidr.version == 6)))


def pick_addresses(space: SubnetSpace, count: int) -> list[int]:
    """`count` automatic addresses (InsufficientFreeAddressesInSubnet when the subnet has fewer)."""
    picked = space.pick_addresses(count, _draw(space))
    if picked is None:
        raise EC2ClientError(
            "InsufficientFreeAddressesInSubnet",
            "The specified subnet does not have enough free addresses to satisfy the request.",
        )
    return picked


def pick_prefixes(space: SubnetSpace, count: int, named: list[Network]) -> list[Network]:
    """The named prefixes if they are free, else `count` automatic ones; all or none."""
    for prefix in named:
        reason = space.unusable_prefix(prefix)
        if reason is not None or named.count(prefix) > 1:
            raise EC2ClientError("InvalidParameterValue", reason or f"{prefix} is named twice")
    if named:
        return named
    picked = space.pick_prefixes(count)
    if picked is None:
        raise EC2ClientError(_settings.capacity_error, _CAPACITY_MESSAGES[_settings.capacity_error])
    return picked


def check_named_addresses(space: SubnetSpace, addresses: Iterable[str], interface: NetworkInterface | None) -> None:
    """Named addresses must be free, or held by `interface` already (assigning again is a no-op)."""
    own = {a["PrivateIpAddress"] for a in interface.private_ip_addresses} if interface else set()
    for address in addresses:
        if address in own:
            continue
        value = int(ipaddress.ip_address(address))
        if space.held(value):
            raise EC2ClientError("InvalidIPAddress.InUse", f"Address {address} is in use")
        reason = space.unusable_address(value)
        if reason is not None:
            raise EC2ClientError("InvalidParameterValue", reason)


def _instance_primary_address(subnet: Subnet, instance: Any) -> str:
    """A launched instance's primary address: the subnet's lowest free one (moto's order)."""
    space = ipv4_space(subnet).with_addresses(int(ipaddress.ip_address(a)) for a in subnet._subnet_ips)
    address = next((a for a in range(space.first, space.last + 1) if space.free_for_automatic_address(a)), None)
    if address is None:
        raise EC2ClientError(
            "InsufficientFreeAddressesInSubnet",
            "The specified subnet does not have enough free addresses to satisfy the request.",
        )
    text = str(ipaddress.IPv4Address(address))
    subnet._subnet_ips[text] = instance
    return text


# What the interface's instance allows.


def _instance_type(interface: NetworkInterface) -> dict[str, Any] | None:
    return INSTANCE_TYPES.get(interface.instance.instance_type) if interface.instance else None


def check_prefix_support(interface: NetworkInterface) -> None:
    """Prefixes only on an instance type built on Nitro (or bare metal); unattached: no instance to ask."""
    instance_type = _instance_type(interface)
    if instance_type and instance_type.get("Hypervisor") != "nitro" and not instance_type.get("BareMetal"):
        raise EC2ClientError(
            "InvalidParameterValue",
            f"Prefix delegation is not supported for instance type {instance_type['InstanceType']}",
        )


def check_slots(interface: NetworkInterface, more: int) -> None:
    """Primary, secondary addresses and IPv4 prefixes share the instance type's per-interface limit."""
    instance_type = _instance_type(interface)
    if instance_type is None or more == 0:
        return
    limit = int(instance_type["NetworkInfo"]["Ipv4AddressesPerInterface"])
    used = len(interface.private_ip_addresses) + len(prefixes_of(interface, 4))
    if used + more > limit:
        raise EC2ClientError(
            "PrivateIpAddressLimitExceeded",
            f"Number of private addresses will exceed limit: {used} in use, {more} asked, {limit} allowed.",
        )


def _prefix_request(response: EC2Response, version: int) -> tuple[int, list[Network]]:
    """The prefix count and the named prefixes of a request; both together is an error."""
    name = f"Ipv{version}Prefix"
    count = response._get_int_param(f"{name}Count", 0)
    named = [_network(p[name] if isinstance(p, dict) else p) for p in response._get_param(f"{name}es", [])]
    if count and named:
        raise EC2ClientError("InvalidParameterCombination", f"{name}Count and {name}es cannot be used together")
    if count < 0:
        raise EC2ClientError("InvalidParameterValue", f"{name}Count must not be negative")
    return count, named


def _network(text: str) -> Network:
    """A prefix as a request names it (InvalidParameterValue unless a CIDR without host bits)."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise EC2ClientError("InvalidParameterValue", f"{text} is not a valid prefix: {exc}") from None


# The calls.


def _create_network_interface(self: EC2Response) -> ActionResult:
    """CreateNetworkInterface: the primary address first, then secondaries or prefixes; when
    they cannot all be had, no interface is created."""
    subnet = self.ec2_backend.get_subnet(self._get_param("SubnetId"))
    named = self._get_param("PrivateIpAddresses", [])
    primary, secondaries = _named_addresses(self._get_param("PrivateIpAddress"), named)
    secondary_count = self._get_int_param("SecondaryPrivateIpAddressCount", 0)
    prefix_count, named_prefixes = _prefix_request(self, 4)
    if (prefix_count or named_prefixes) and (secondaries or secondary_count):
        raise EC2ClientError(
            "InvalidParameterCombination", "Prefixes cannot be combined with secondary private IP addresses"
        )
    self.error_on_dryrun()

    space = ipv4_space(subnet)
    check_named_addresses(space, [a for a in (primary, *secondaries) if a], None)
    space = space.with_addresses(int(ipaddress.ip_address(a)) for a in (primary, *secondaries) if a)
    if primary is None:
        [first] = pick_addresses(space, 1)
        primary = str(ipaddress.IPv4Address(first))
        space = space.with_addresses([first])
    automatic = pick_addresses(space, secondary_count)
    secondaries += [str(ipaddress.IPv4Address(a)) for a in automatic]
    prefixes = pick_prefixes(space.with_addresses(automatic), prefix_count, named_prefixes)
    ipv6 = _ipv6_addresses(subnet, self)

    interface = self.ec2_backend.create_network_interface(
        subnet,
        primary,
        [{"Primary": a == primary, "PrivateIpAddress": a} for a in (primary, *secondaries)],
        self._get_param("Groups", []),
        self._get_param("Description"),
        add_tag_specification(self._get_param("TagSpecifications", [])),
        ipv6_addresses=ipv6,
    )
    _add_prefixes(interface, 4, prefixes)
    return ActionResult({"NetworkInterface": interface})


def _named_addresses(primary: str | None, specifications: list[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """The primary address and the secondaries a CreateNetworkInterface names."""
    secondaries = []
    for specification in specifications:
        address = specification.get("PrivateIpAddress")
        if specification.get("Primary") and primary is None:
            primary = address
        elif address and address != primary:
            secondaries.append(address)
    return primary, secondaries


def _ipv6_addresses(subnet: Subnet, response: EC2Response) -> list[str]:
    """The IPv6 addresses a CreateNetworkInterface names, or as many automatic ones as it asks."""
    named = [a["Ipv6Address"] for a in response._get_param("Ipv6Addresses", [])]
    count = response._get_int_param("Ipv6AddressCount", 0)
    if named or not count:
        return named
    return [str(ipaddress.IPv6Address(a)) for a in pick_addresses(ipv6_space(subnet), count)]


def _assign_private_ip_addresses(self: EC2Response) -> ActionResult:
    """AssignPrivateIpAddresses: named or automatic secondaries, and prefixes; answers what is new."""
    interface = self.ec2_backend.get_network_interface(self._get_param("NetworkInterfaceId"))
    named = self._get_param("PrivateIpAddresses", [])
    count = self._get_int_param("SecondaryPrivateIpAddressCount", 0)
    prefix_count, named_prefixes = _prefix_request(self, 4)
    if prefix_count or named_prefixes:
        check_prefix_support(interface)

    space = ipv4_space(interface.subnet)
    check_named_addresses(space, named, interface)
    own = {a["PrivateIpAddress"] for a in interface.private_ip_addresses}
    new = list(dict.fromkeys(a for a in named if a not in own))
    automatic = pick_addresses(space, count) if not named else []
    new += [str(ipaddress.IPv4Address(a)) for a in automatic]
    space = space.with_addresses(int(ipaddress.ip_address(a)) for a in new)
    prefixes = pick_prefixes(space, prefix_count, named_prefixes) if prefix_count or named_prefixes else []
    check_slots(interface, len(new) + len(prefixes))

    interface.private_ip_addresses.extend({"Primary": False, "PrivateIpAddress": a} for a in new)
    _add_prefixes(interface, 4, prefixes)
    result: dict[str, Any] = {
        "NetworkInterfaceId": interface.id,
        "AssignedPrivateIpAddresses": [{"PrivateIpAddress": a} for a in new],
    }
    if prefixes:
        result["AssignedIpv4Prefixes"] = [{"Ipv4Prefix": str(p)} for p in prefixes]
    return ActionResult(result)


def _unassign_private_ip_addresses(self: EC2Response) -> EmptyResult:
    """UnassignPrivateIpAddresses: named secondaries (as moto does) and prefixes, which must all be
    on the interface, else nothing changes."""
    interface = self.ec2_backend.get_network_interface(self._get_param("NetworkInterfaceId"))
    prefixes = _held_prefixes(interface, 4, self._get_param("Ipv4Prefixes", []))
    self.ec2_backend.unassign_private_ip_addresses(interface.id, self._get_param("PrivateIpAddresses", []))
    _remove_prefixes(interface, 4, prefixes)
    return EmptyResult()


def _held_prefixes(interface: NetworkInterface, version: int, named: list[str]) -> set[Network]:
    """The named prefixes, each of which the interface must hold (InvalidParameterValue otherwise)."""
    prefixes = {_network(p) for p in named}
    missing = sorted(str(p) for p in prefixes - set(prefixes_of(interface, version)))
    if missing:
        raise EC2ClientError(
            "InvalidParameterValue", f"Prefixes {', '.join(missing)} are not assigned to interface {interface.id}"
        )
    return prefixes


def _assign_ipv6_addresses(self: EC2Response) -> ActionResult:
    """AssignIpv6Addresses: named or automatic addresses, and /80 prefixes; answers what is new."""
    interface = self.ec2_backend.get_network_interface(self._get_param("NetworkInterfaceId"))
    named = [a for a in self._get_param("Ipv6Addresses", []) if a not in interface.ipv6_addresses]
    count = self._get_int_param("Ipv6AddressCount", 0)
    prefix_count, named_prefixes = _prefix_request(self, 6)
    if prefix_count or named_prefixes:
        check_prefix_support(interface)

    space = ipv6_space(interface.subnet)
    new = named or [str(ipaddress.IPv6Address(a)) for a in pick_addresses(space, count)]
    space = space.with_addresses(int(ipaddress.ip_address(a)) for a in new)
    prefixes = pick_prefixes(space, prefix_count, named_prefixes) if prefix_count or named_prefixes else []

    interface.ipv6_addresses.extend(new)
    _add_prefixes(interface, 6, prefixes)
    result: dict[str, Any] = {"NetworkInterfaceId": interface.id, "AssignedIpv6Addresses": new}
    if prefixes:
        result["AssignedIpv6Prefixes"] = [str(p) for p in prefixes]
    return ActionResult(result)


def _unassign_ipv6_addresses(self: EC2Response) -> ActionResult:
    """UnassignIpv6Addresses: named addresses (as moto does) and /80 prefixes, all on the interface."""
    interface = self.ec2_backend.get_network_interface(self._get_param("NetworkInterfaceId"))
    prefixes = _held_prefixes(interface, 6, self._get_param("Ipv6Prefixes", []))
    addresses = self.ec2_backend.unassign_ipv6_addresses(interface.id, self._get_param("Ipv6Addresses", []))
    _remove_prefixes(interface, 6, prefixes)
    result: dict[str, Any] = {"NetworkInterfaceId": interface.id, "UnassignedIpv6Addresses": addresses}
    if prefixes:
        result["UnassignedIpv6Prefixes"] = [str(p) for p in prefixes]
    return ActionResult(result)
