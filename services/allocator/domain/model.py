"""Value types of the allocator's domain and input validation (no I/O)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from services.core.family import Family
from services.core.reasons import ErrorReason

from .errors import InvalidArgument

DEFAULT_POOL = "default"
MAX_NAME_LENGTH = 253
MAX_OWNER_LENGTH = 256
MAX_KEY_LENGTH = 256
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def parse_family(value: int) -> Family:
    """The family of a wire value; an unknown value is malformed input."""
    try:
        return Family(value)
    except ValueError:
        raise InvalidArgument(f"unknown address family {value}", reason=ErrorReason.INVALID_FAMILY) from None


def pool_or_default(pool: str) -> str:
    """Seed `PoolOrDefault`: the empty pool name means "default"."""
    return pool or DEFAULT_POOL


def validate_name(value: str, what: str) -> str:
    """Node and pool names: DNS-label-like, at most 253 characters."""
    if not value:
        raise InvalidArgument(f"{what} is required", reason=ErrorReason.required(what))
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_LENGTH} characters", reason=ErrorReason.NAME_TOO_LONG)
    if not _NAME_RE.match(value):
        raise InvalidArgument(
            f"{what} {value!r} has characters outside [A-Za-z0-9._-]", reason=ErrorReason.INVALID_NAME
        )
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


def parse_ip(value: str, family: Family | None = None) -> tuple[str, Family]:
    """Normalise an address; refuse malformed ones and ones of another family than `family`."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not an IP address", reason=ErrorReason.INVALID_IP) from None
    found = Family.IPV4 if address.version == 4 else Family.IPV6
    if family not in (None, Family.UNSPECIFIED) and found != family:
        raise InvalidArgument(f"{value} is not an {family.name} address", reason=ErrorReason.WRONG_FAMILY)
    return str(address), found


def validate_timeout(seconds: int, what: str = "timeout") -> int:
    """Timeouts in seconds: 0..30 days."""
    if seconds < 0 or seconds > MAX_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"{what} must be between 0 and {MAX_TIMEOUT_SECONDS} seconds", reason=ErrorReason.INVALID_TIMEOUT
        )
    return seconds


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    """What an allocation result carries about the interface holding the address."""

    id: str = ""
    mac: str = ""
    device_index: int = 0
    gateway_ip: str = ""
    subnet_cidr: str = ""


@dataclass(frozen=True, slots=True)
class Allocation:
    """One allocated address."""

    ip: str
    family: Family
    pool: str
    owner: str
    interface: InterfaceInfo = field(default_factory=InterfaceInfo)
    expiration_uuid: str = ""
    vpc_cidrs: tuple[str, ...] = ()
