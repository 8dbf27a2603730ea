"""The local EC2's subnet address map, table-driven (the rules boto3 sees are tested against the
running server in tests/integration/dev/)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from dev.ec2.subnet_space import SubnetSpace


def a(text: str) -> int:
    return int(ipaddress.ip_address(text))


def n(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def space(
    cidr: str = "10.0.1.0/26",
    addresses: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = (),
    **reservations: tuple[str, ...],
) -> SubnetSpace:
    return SubnetSpace(
        cidr=n(cidr),
        addresses=frozenset(a(x) for x in addresses),
        prefixes=frozenset(n(p) for p in prefixes),
        prefix_reservations=tuple(n(r) for r in reservations.get("prefix", ())),
        explicit_reservations=tuple(n(r) for r in reservations.get("explicit", ())),
    )


@pytest.mark.parametrize(
    "subnet, count, expected",
    [
        (
            space(addresses=("10.0.1.4",)),
            2,
            ["10.0.1.16/28", "10.0.1.32/28"],
        ),  # .0/28 and .48/28 hold reserved addresses
        (space(addresses=("10.0.1.4",)), 3, None),  # all or nothing
        (space(addresses=("10.0.1.17", "10.0.1.40")), 1, None),  # fragmented: no whole block
        (space(prefixes=("10.0.1.16/28",)), 1, ["10.0.1.32/28"]),
        (space("10.0.1.0/25", prefix=("10.0.1.96/28",)), 2, ["10.0.1.96/28", "10.0.1.16/28"]),  # reservation first
        (space("10.0.1.0/25", explicit=("10.0.1.0/27",)), 1, ["10.0.1.32/28"]),  # explicit space never automatic
        (space("2600:1f18::/64"), 1, ["2600:1f18:0:0:1::/80"]),  # IPv6: the first /80 holds reserved addresses
        (space("10.0.1.0/26"), 0, []),
    ],
)
def test_pick_prefixes(subnet: SubnetSpace, count: int, expected: list[str] | None) -> None:
    picked = subnet.pick_prefixes(count)
    assert (None if picked is None else [str(p) for p in picked]) == expected


@pytest.mark.parametrize(
    "prefix, usable",
    [
        ("10.0.1.16/28", True),
        ("10.0.1.0/28", False),  # EC2's reserved addresses
        ("10.0.1.48/28", False),  # the last address
        ("10.0.1.32/28", False),  # holds 10.0.1.33
        ("10.0.1.8/29", False),  # not a /28
        ("10.0.2.16/28", False),  # outside
    ],
)
def test_unusable_prefix(prefix: str, usable: bool) -> None:
    assert (space(addresses=("10.0.1.33",)).unusable_prefix(n(prefix)) is None) == usable


def test_automatic_addresses_are_drawn_then_the_lowest_free() -> None:
    subnet = space(addresses=("10.0.1.4",), prefixes=("10.0.1.16/28",), prefix=("10.0.1.32/28",))
    draws: Iterator[int] = iter([a("10.0.1.40"), a("10.0.1.50")])  # inside a reservation, then free
    assert subnet.pick_addresses(1, lambda: next(draws)) == [a("10.0.1.50")]
    # Draws that never hit a free address: the lowest free ones instead.
    assert subnet.pick_addresses(2, lambda: a("10.0.1.20")) == [a("10.0.1.5"), a("10.0.1.6")]
    free = 64 - 5 - 1 - 16 - 16
    assert subnet.pick_addresses(free + 1, lambda: a("10.0.1.4")) is None


def test_named_addresses_must_be_free() -> None:
    subnet = space(addresses=("10.0.1.4",), prefixes=("10.0.1.16/28",), explicit=("10.0.1.48/29",))
    assert subnet.unusable_address(a("10.0.1.5")) is None
    assert subnet.unusable_address(a("10.0.1.49")) is None  # named: explicit reservations allow it
    assert subnet.unusable_address(a("10.0.1.4")) is not None
    assert subnet.unusable_address(a("10.0.1.20")) is not None  # in a prefix
    assert subnet.unusable_address(a("10.0.1.2")) is not None
    assert subnet.unusable_address(a("10.0.2.9")) is not None


def test_available_count() -> None:
    assert space().available_count() == 64 - 5
    assert space(addresses=("10.0.1.4",), prefixes=("10.0.1.16/28",)).available_count() == 64 - 5 - 1 - 16
    # A prefix reservation counts whole, whatever inside it is held already.
    reserved = space("10.0.1.0/25", addresses=("10.0.1.70",), prefixes=("10.0.1.80/28",), prefix=("10.0.1.64/27",))
    assert reserved.available_count() == 128 - 5 - 32
