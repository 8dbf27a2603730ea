"""Input validation of the domain: each malformed input is refused with a stable reason."""

from __future__ import annotations

import pytest

from services.allocator.domain import model
from services.allocator.domain.errors import InvalidArgument
from services.allocator.domain.model import (
    parse_family,
    parse_ip,
    parse_ipv6_prefix,
    parse_prefixes,
    validate_name,
    validate_text,
    validate_timeout,
)
from services.core.family import Family
from services.core.reasons import ErrorReason


@pytest.mark.parametrize(
    "value,family,expected",
    [
        ("10.0.0.1", None, ("10.0.0.1", Family.IPV4)),
        ("2001:DB8::0:1", None, ("2001:db8::1", Family.IPV6)),
        ("10.0.0.1", Family.IPV4, ("10.0.0.1", Family.IPV4)),
        ("10.0.0.1", Family.UNSPECIFIED, ("10.0.0.1", Family.IPV4)),
    ],
)
def test_parse_ip_normalises(value: str, family: Family | None, expected: tuple[str, Family]) -> None:
    assert parse_ip(value, family) == expected


@pytest.mark.parametrize(
    "value,family,reason",
    [
        ("10.0.0.256", None, "INVALID_IP"),
        ("", None, "INVALID_IP"),
        ("10.0.0.1/24", None, "INVALID_IP"),
        ("2001:db8::5%eth0", None, "INVALID_IP"),
        ("fe80::1%eth0", Family.IPV6, "INVALID_IP"),
        ("10.0.0.1", Family.IPV6, "WRONG_FAMILY"),
        ("::1", Family.IPV4, "WRONG_FAMILY"),
    ],
)
def test_parse_ip_refuses(value: str, family: Family | None, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_ip(value, family)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "value,reason",
    [
        ("", "NODE_REQUIRED"),
        ("a" * 254, "NAME_TOO_LONG"),
        ("bad name", "INVALID_NAME"),
        ("-leading", "INVALID_NAME"),
        ("n{1}", "INVALID_NAME"),
    ],
)
def test_validate_name_refuses(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_name(value, "node")
    assert info.value.reason == reason


def test_validate_name_accepts_dns_like_names() -> None:
    assert validate_name("ip-10-0-1-17.ec2.internal", "node") == "ip-10-0-1-17.ec2.internal"


def test_validate_name_remembers_a_bounded_number_of_valid_names() -> None:
    for i in range(model._VALID_NAMES_KEPT + 10):
        assert validate_name(f"node-{i}", "node") == f"node-{i}"
        assert len(model._VALID_NAMES) <= model._VALID_NAMES_KEPT
    assert "node-0" not in model._VALID_NAMES  # emptied when full
    assert validate_name("node-0", "pool") == "node-0"  # a remembered name is valid for a pool too
    with pytest.raises(InvalidArgument):
        validate_name("bad name", "node")


@pytest.mark.parametrize(
    "value,required,reason",
    [
        ("", True, "OWNER_REQUIRED"),
        ("x" * 257, True, "TEXT_TOO_LONG"),
        ("pod\tname", True, "INVALID_TEXT"),
    ],
)
def test_validate_text_refuses(value: str, required: bool, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_text(value, "owner", 256, required=required)
    assert info.value.reason == reason


@pytest.mark.parametrize("seconds", [-1, 30 * 24 * 3600 + 1])
def test_validate_timeout_refuses(seconds: int) -> None:
    with pytest.raises(InvalidArgument):
        validate_timeout(seconds)


def test_parse_family_refuses_unknown_values() -> None:
    assert parse_family(2) is Family.IPV6
    with pytest.raises(InvalidArgument) as caught:
        parse_family(7)
    assert caught.value.reason == "INVALID_FAMILY"


@pytest.mark.parametrize(
    "value, interface_id, subnet",
    [
        ("10.0.1.8/28", "eni-1", "10.0.0.0/16"),  # off its boundary
        ("10.0.1.0/27", "eni-1", "10.0.0.0/16"),
        ("10.0.1.0", "eni-1", "10.0.0.0/16"),  # an address is a /32
        ("10.1.0.0/28", "eni-1", "10.0.0.0/16"),  # outside the subnet
        ("10.0.1.0/28", "eni-1", "10.0.1.0/29"),  # wider than the subnet
        ("2001:db8::/80", "eni-1", "10.0.0.0/16"),
        ("10.0.1.0/28", "", "10.0.0.0/16"),  # no interface
        ("10.0.1.0/28", "eni-1", ""),  # no subnet to check it against
        ("10.0.1.0/28", "eni-1", "2001:db8::/64"),
    ],
)
def test_parse_prefixes_refuses(value: str, interface_id: str, subnet: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_prefixes([value], interface_id, subnet)
    assert info.value.reason == ErrorReason.INVALID_PREFIX


def test_parse_prefixes_accepts_canonical_28s_inside_the_subnet() -> None:
    assert parse_prefixes(["10.0.1.0/28", "10.0.255.240/28"], "eni-1", "10.0.0.0/16") == [
        "10.0.1.0/28",
        "10.0.255.240/28",
    ]
    assert parse_prefixes([], "", "") == []


@pytest.mark.parametrize(
    "value, subnet",
    [
        ("2001:db8:0:7::/64", "2001:db8:0:7::/64"),  # not a /80
        ("2001:db8:0:7::1/80", "2001:db8:0:7::/64"),  # host bits set
        ("2001:db8:0:8::/80", "2001:db8:0:7::/64"),  # outside the subnet
        ("10.0.1.0/28", "2001:db8:0:7::/64"),
        ("2001:db8:0:7::/80", ""),  # no IPv6 subnet to check it against
        ("2001:db8:0:7::/80", "10.0.0.0/16"),
    ],
)
def test_parse_ipv6_prefix_refuses(value: str, subnet: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_ipv6_prefix(value, "eni-1", subnet)
    assert info.value.reason == ErrorReason.INVALID_PREFIX


def test_parse_ipv6_prefix_writes_it_canonically() -> None:
    assert parse_ipv6_prefix("2001:DB8:0:7:0000::/80", "eni-1", "2001:db8:0:7::/64") == "2001:db8:0:7::/80"
    assert parse_ipv6_prefix("", "", "") == ""
