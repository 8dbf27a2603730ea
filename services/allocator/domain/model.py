"""Value types of the allocator's domain and input validation (no I/O)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.core.family import Family
from services.core.reasons import ErrorReason

from .errors import InvalidArgument

DEFAULT_POOL = "default"
MAX_NAME_LENGTH = 253
MAX_OWNER_LENGTH = 256
MAX_KEY_LENGTH = 256
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600
MAX_SPEC_ITEMS = 100  # entries of each list or map of a node spec (subnet ids, tags, security groups)
MAX_SPEC_ITEM_LENGTH = 512  # an id, or a tag as key=value (EC2: keys up to 128, values up to 256)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


_FAMILIES = {int(f): f for f in Family}


def parse_family(value: int) -> Family:
    """The family of a wire value; an unknown value is malformed input."""
    family = _FAMILIES.get(value)  # a fifth of what Family(value) costs
    if family is None:
        raise InvalidArgument(f"unknown address family {value}", reason=ErrorReason.INVALID_FAMILY)
    return family


def pool_or_default(pool: str) -> str:
    """Seed `PoolOrDefault`: the empty pool name means "default"."""
    return pool or DEFAULT_POOL


# Names that passed `validate_name` lately: the same few nodes and pools come in every call, and
# the regular expression costs several times a set lookup. Emptied when full.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_KEPT = 4096


def validate_name(value: str, what: str) -> str:
    """Node and pool names: DNS-label-like, at most 253 characters."""
    if value in _VALID_NAMES:
        return value
    if not value:
        raise InvalidArgument(f"{what} is required", reason=ErrorReason.required(what))
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_LENGTH} characters", reason=ErrorReason.NAME_TOO_LONG)
    if not _NAME_RE.match(value):
        raise InvalidArgument(
            f"{what} {value!r} has characters outside [A-Za-z0-9._-]", reason=ErrorReason.INVALID_NAME
        )
    if len(_VALID_NAMES) >= _VALID_NAMES_KEPT:
        _VALID_NAMES.clear()
    _VALID_NAMES.add(value)
    return value


def validate_text(value: str, what: str, max_length: int, *, required: bool) -> str:
    """Free text (owners, keys): printable, bounded; tabs and newlines are refused."""
    if not value:
        if required:
            raise InvalidArgument(f"{what} is required", reason=ErrorReason.required(what))
        return value
    if len(value) > max_length:
        raise InvalidArgument(f"{what} is longer than {max_length} characters", reason=ErrorReason.TEXT_TOO_LONG)
    if not value.isprintable():
        raise InvalidArgument(f"{what} has control characters", reason=ErrorReason.INVALID_TEXT)
    return value


MAX_FENCING_TOKEN = 2**53  # the scripts compare tokens as Lua numbers (doubles): exact up to here


def validate_fence(token: int) -> int:
    """A worker's fencing token: 0 (none) up to MAX_FENCING_TOKEN."""
    if not 0 <= token <= MAX_FENCING_TOKEN:
        raise InvalidArgument(f"fencing token {token} is outside 0..2^53", reason=ErrorReason.INVALID_FENCING_TOKEN)
    return token


def parse_ip(value: str, family: Family | None = None) -> tuple[str, Family]:
    """Normalise an address; refuse malformed ones, IPv6 ones with a zone id and ones of another family
    than `family`. Every address that enters the allocator passes here."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not an IP address", reason=ErrorReason.INVALID_IP) from None
    if getattr(address, "scope_id", None):  # "fe80::1%eth0": a zone names a host's link, not a pool address
        raise InvalidArgument(f"{value!r} carries an IPv6 zone id", reason=ErrorReason.INVALID_IP)
    found = Family.IPV4 if address.version == 4 else Family.IPV6
    if family not in (None, Family.UNSPECIFIED) and found != family:
        raise InvalidArgument(f"{value} is not an {family.name} address", reason=ErrorReason.WRONG_FAMILY)
    return str(address), found


def parse_cidrs(values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The VPC CIDRs a worker reports; a malformed one is refused."""
    try:
        return [ipaddress.ip_network(v, strict=False) for v in values]
    except ValueError:
        raise InvalidArgument(f"{list(values)!r} holds a malformed CIDR", reason=ErrorReason.INVALID_CIDR) from None


def check_subnet(cidr: str, gateway: str, family: Family) -> None:
    """Refuses a reported subnet or gateway that is malformed or of the other family ("" = unknown)."""
    if cidr:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidArgument(f"{cidr!r} is not a CIDR", reason=ErrorReason.INVALID_CIDR) from None
        if network.version != (4 if family is Family.IPV4 else 6):
            raise InvalidArgument(f"{cidr} is not an {family.name} subnet", reason=ErrorReason.WRONG_FAMILY)
    if gateway:
        parse_ip(gateway, family)


_Network = TypeVar("_Network", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _parse_delegated(value: str, network: type[_Network], length: int, family: str) -> _Network:
    """A prefix of `length` bits on its boundary; anything else is refused with INVALID_PREFIX."""
    try:
        prefix = network(value, strict=True)
    except ValueError:
        raise InvalidArgument(
            f"{value!r} is not a canonical {family} prefix", reason=ErrorReason.INVALID_PREFIX
        ) from None
    if prefix.prefixlen != length:
        raise InvalidArgument(f"{value} is not a /{length}", reason=ErrorReason.INVALID_PREFIX)
    return prefix


def parse_prefix(value: str) -> ipaddress.IPv4Network:
    """An IPv4 /28 prefix, on its boundary ("10.0.1.16/28"); anything else is refused."""
    return _parse_delegated(value, ipaddress.IPv4Network, 28, "IPv4")


def parse_ipv6_80(value: str) -> ipaddress.IPv6Network:
    """An IPv6 /80 prefix on its boundary ("2001:db8:0:1:2::/80"); anything else is refused."""
    return _parse_delegated(value, ipaddress.IPv6Network, 80, "IPv6")


def parse_ipv6_prefix(value: str, interface_id: str, subnet_cidr: str) -> str:
    """An IPv6 /80 delegated to an interface, canonical, inside the interface's IPv6 subnet ("" = none)."""
    if not value:
        return ""
    prefix = parse_ipv6_80(value)
    if not interface_id or not subnet_cidr:
        raise InvalidArgument(
            f"prefix {value} needs its interface's id and IPv6 subnet", reason=ErrorReason.INVALID_PREFIX
        )
    subnet = ipaddress.ip_network(subnet_cidr, strict=False)
    if not isinstance(subnet, ipaddress.IPv6Network) or not prefix.subnet_of(subnet):
        raise InvalidArgument(
            f"prefix {value} lies outside its interface's IPv6 subnet {subnet_cidr}", reason=ErrorReason.INVALID_PREFIX
        )
    return str(prefix)


def parse_prefixes(values: Sequence[str], interface_id: str, subnet_cidr: str) -> list[str]:
    """IPv4 /28 prefixes delegated to an interface, canonical: each inside the interface's IPv4
    subnet, so both must be known."""
    out: list[str] = []
    for value in values:
        prefix = parse_prefix(value)
        if not interface_id or not subnet_cidr:
            raise InvalidArgument(
                f"prefix {value} needs its interface's id and IPv4 subnet", reason=ErrorReason.INVALID_PREFIX
            )
        subnet = ipaddress.ip_network(subnet_cidr, strict=False)
        if not isinstance(subnet, ipaddress.IPv4Network) or not prefix.subnet_of(subnet):
            raise InvalidArgument(
                f"prefix {value} lies outside its interface's subnet {subnet_cidr}", reason=ErrorReason.INVALID_PREFIX
            )
        out.append(str(prefix))
    return out


def check_inside_vpc(ips: Sequence[str], cidrs: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    """Refuses an address in none of the VPC's CIDRs of its family. A family of which no CIDR is known
    (a VPC without an IPv6 block reported, or no CIDRs reported at all) is not checked."""
    for ip in ips:
        address = ipaddress.ip_address(ip)
        mine = [c for c in cidrs if c.version == address.version]
        if mine and not any(address in c for c in mine):
            raise InvalidArgument(
                f"{ip} lies outside the node's VPC CIDRs {[str(c) for c in mine]}", reason=ErrorReason.IP_OUTSIDE_VPC
            )


def validate_spec_items(items: Mapping[str, Sequence[str]]) -> None:
    """Bounds a node spec's lists and maps (each entry of a map given as "key=value"), so that a
    node stays well inside a message and a page of nodes inside gRPC's message limit."""
    for what, values in items.items():
        if len(values) > MAX_SPEC_ITEMS:
            raise InvalidArgument(
                f"{what} has {len(values)} entries, at most {MAX_SPEC_ITEMS}", reason=ErrorReason.SPEC_TOO_LARGE
            )
        if any(len(v) > MAX_SPEC_ITEM_LENGTH for v in values):
            raise InvalidArgument(
                f"an entry of {what} is longer than {MAX_SPEC_ITEM_LENGTH} characters",
                reason=ErrorReason.SPEC_TOO_LARGE,
            )


def validate_page_size(size: int) -> int:
    """0 = the default page size."""
    if size < 0 or size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE_SIZE}", reason=ErrorReason.INVALID_PAGE)
    return size or DEFAULT_PAGE_SIZE


def validate_timeout(seconds: int, what: str = "timeout") -> int:
    """Timeouts in seconds: 0..30 days."""
    if seconds < 0 or seconds > MAX_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"{what} must be between 0 and {MAX_TIMEOUT_SECONDS} seconds", reason=ErrorReason.INVALID_TIMEOUT
        )
    return seconds


@dataclass(slots=True)
class Allocation:
    """One allocated address, with what a caller configures it by: the interface holding it, and the
    subnet and gateway of the address's own family. Not frozen: a frozen dataclass's `__init__`
    sets each field through `object.__setattr__`, five times the cost, on every allocation."""

    ip: str
    family: Family
    pool: str
    owner: str
    interface_id: str = ""
    mac: str = ""
    device_index: int = 0
    gateway_ip: str = ""
    subnet_cidr: str = ""
    expiration_uuid: str = ""
    vpc_cidrs: tuple[str, ...] = ()
