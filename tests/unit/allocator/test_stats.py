"""Node statistics about interfaces (Cilium's definitions), table-driven on an m5.large (3 x 10 IPv4)."""

from __future__ import annotations

import pytest

from services.allocator.domain.pool import NodeInterface, PrefixUse, prefix_uses
from services.allocator.domain.stats import node_stats
from services.core.pool_math import PoolCounts, Watermarks


def interface(device: int, secondaries: int, ipv6: int = 0) -> NodeInterface:
    return NodeInterface(
        id=f"eni-{device}",
        device_index=device,
        addresses=tuple(f"10.0.{device}.{i}" for i in range(secondaries))
        + tuple(f"2001:db8:{device}::{i + 1:x}" for i in range(ipv6)),
    )


# first interface index, interfaces as (device, secondary IPv4, IPv6), (candidates, empty slots, remaining)
CASES = [
    (0, [(0, 0)], (1, 2, 3)),  # eth0 with room, two slots free
    (0, [(0, 9), (1, 9), (2, 3)], (1, 0, 1)),  # two full, one with room, no slot left
    (1, [(0, 0)], (0, 2, 2)),  # eth0 is not the pool's
    (1, [(0, 0), (2, 9)], (0, 1, 1)),  # device 2 full, device 1 free
    (0, [(0, 9), (1, 9), (2, 9)], (0, 0, 0)),  # at capacity
    (0, [(0, 8, 4), (1, 9), (2, 9)], (1, 0, 1)),  # IPv6 addresses leave the IPv4 room as it is
]


@pytest.mark.parametrize("first_index,interfaces,expected", CASES)
def test_interface_statistics(
    first_index: int, interfaces: list[tuple[int, ...]], expected: tuple[int, int, int]
) -> None:
    stats = node_stats(
        PoolCounts(0, 0),
        PoolCounts(0, 0),
        Watermarks(),
        ipv6_enabled=False,
        interfaces=[interface(*i) for i in interfaces],
        max_interfaces=3,
        ipv4_per_interface=10,
        first_interface_index=first_index,
    )
    assert (stats.interface_candidates, stats.empty_interface_slots, stats.remaining_interfaces) == expected


def test_unknown_limits_give_no_interface_figures() -> None:
    stats = node_stats(
        PoolCounts(8, 0),
        PoolCounts(0, 0),
        Watermarks(),
        ipv6_enabled=False,
        interfaces=[interface(0, 8)],
        max_interfaces=0,
        ipv4_per_interface=0,
        first_interface_index=0,
    )
    assert (stats.interface_candidates, stats.empty_interface_slots, stats.remaining_interfaces) == (0, 0, 0)
    assert (stats.available_ips, stats.needed_ipv4) == (8, 0)


# IPv6 (available, used), ipv6_enabled, (needed_ipv6, excess_ipv6) with pre_allocate 8
IPV6_CASES = [
    ((0, 0), True, (8, 0)),
    ((10, 2), True, (0, 0)),  # 8 free: the watermark
    ((20, 2), True, (0, 10)),  # 18 free: 10 above it
    ((20, 2), False, (0, 18)),  # IPv6 off for the node: nothing needed, every free one is given back
]


@pytest.mark.parametrize("v6,enabled,expected", IPV6_CASES)
def test_ipv6_needed_and_excess(v6: tuple[int, int], enabled: bool, expected: tuple[int, int]) -> None:
    stats = node_stats(
        PoolCounts(8, 0),
        PoolCounts(*v6),
        Watermarks(pre_allocate=8),
        ipv6_enabled=enabled,
        interfaces=[],
        max_interfaces=0,
        ipv4_per_interface=0,
        first_interface_index=0,
    )
    assert (stats.needed_ipv6, stats.excess_ipv6) == expected
    assert stats.excess_ipv4 == 0  # IPv4 is at its watermark whatever IPv6 holds


def test_a_prefix_takes_one_slot_of_its_interface() -> None:
    full = NodeInterface(id="eni-0", device_index=0, addresses=("10.0.0.5",), ipv4_prefixes=("10.0.1.0/28",) * 8)
    room = NodeInterface(id="eni-1", device_index=1, ipv4_prefixes=("10.0.2.0/28",) * 7)
    stats = node_stats(
        PoolCounts(0, 0),
        PoolCounts(0, 0),
        Watermarks(),
        ipv6_enabled=False,
        interfaces=[full, room],
        max_interfaces=3,
        ipv4_per_interface=10,
        first_interface_index=0,
    )
    assert (stats.interface_candidates, stats.empty_interface_slots) == (1, 1)


@pytest.mark.parametrize(
    "prefixes, stranded, expected_capacity, expected_excess",
    [
        (0, 0, 27, 24),  # single addresses: 3 × 9, excess 33 − 1 − 8
        (2, 15, 432, 9),  # prefix mode: 3 × 9 × 16; the prefix in use counts whole (33 − 16 − 8)
    ],
)
def test_capacity_and_excess_in_prefix_mode(
    prefixes: int, stranded: int, expected_capacity: int, expected_excess: int
) -> None:
    stats = node_stats(
        PoolCounts(33, 1),
        PoolCounts(0, 0),
        Watermarks(),
        ipv6_enabled=False,
        interfaces=[],
        max_interfaces=3,
        ipv4_per_interface=10,
        first_interface_index=0,
        prefixes=prefixes,
        stranded=stranded,
    )
    assert (stats.max_allocatable_ipv4, stats.excess_ipv4, stats.ipv4_prefixes) == (
        expected_capacity,
        expected_excess,
        prefixes,
    )


def test_prefix_uses_count_each_address_by_its_state() -> None:
    free = {"10.0.1.0": 0.0, "10.0.1.1": 5_000.0, "10.0.1.2": 9_000.0}  # ms each became free
    uses = prefix_uses(
        {"10.0.1.16/28": "eni-b", "10.0.1.0/28": "eni-a"},
        free,
        allocated={"10.0.1.3", "10.0.1.4", "10.0.1.20"},
        excluded={"10.0.1.5", "10.0.1.3"},  # an excluded address still allocated counts as allocated
        reserved={"10.0.1.6"},
        cooled_by_ms=6_000,
    )
    assert uses == (
        PrefixUse("10.0.1.0/28", "eni-a", free=2, cooling=1, allocated=2, excluded=1, reserved=1),
        PrefixUse("10.0.1.16/28", "eni-b", allocated=1),
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_a_pool_with_an_ipv6_80_needs_no_ipv6_and_has_no_ipv6_excess(enabled: bool) -> None:
    stats = node_stats(
        PoolCounts(0, 0),
        PoolCounts(5, 3),  # three of the /80's addresses allocated, two free again
        Watermarks(pre_allocate=8),
        ipv6_enabled=enabled,
        interfaces=[],
        max_interfaces=3,
        ipv4_per_interface=10,
        first_interface_index=0,
        ipv6_prefix=True,
    )
    assert (stats.needed_ipv6, stats.excess_ipv6, stats.used_ipv6, stats.available_ipv6) == (0, 0, 3, 5)
