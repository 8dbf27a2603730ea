"""Prefix-delegation arithmetic, table-driven."""

from __future__ import annotations

import pytest

from services.core.pool_math import PoolCounts, Watermarks
from services.core.prefixes import (
    max_allocatable_ipv4,
    pool_excess_with_prefixes,
    prefix_capacity,
    prefixes_for,
    supports_prefixes,
    used_with_prefixes,
)


@pytest.mark.parametrize(
    "interfaces, slots, first_index, expected",
    [
        (3, 10, 0, 432),  # m5.large: 3 × 9 × 16 (27 addresses without prefixes)
        (3, 10, 1, 288),  # the primary interface left to the node
        (2, 4, 0, 96),  # t3.small: 2 × 3 × 16
        (4, 15, 0, 896),  # c5.xlarge
        (1, 1, 0, 0),  # a slot for the primary only
        (3, 10, 3, 0),  # no interface left
        (0, 10, 0, 0),  # limits unknown
    ],
)
def test_prefix_capacity(interfaces: int, slots: int, first_index: int, expected: int) -> None:
    assert prefix_capacity(interfaces, slots, first_index) == expected


@pytest.mark.parametrize(
    "needed, free_slots, available, max_allocate, expected",
    [
        (1, 9, 0, 0, 1),  # one address wants a whole prefix
        (16, 9, 0, 0, 1),
        (17, 9, 0, 0, 2),
        (100, 9, 0, 0, 7),
        (200, 9, 0, 0, 9),  # the interface's free slots cap it
        (200, 0, 0, 0, 0),  # no slot free
        (0, 9, 0, 0, 0),  # no deficit
        (-3, 9, 0, 0, 0),
        (40, 9, 0, 32, 2),  # max_allocate 32 from nothing: two prefixes
        (40, 9, 16, 32, 1),  # 16 held: one more reaches it
        (8, 9, 28, 32, 1),  # 4 below max_allocate: a whole prefix still (32 → 44)
        (8, 9, 32, 32, 0),  # at max_allocate: none
        (8, 9, 40, 32, 0),  # past it: none
    ],
)
def test_prefixes_for_a_deficit(needed: int, free_slots: int, available: int, max_allocate: int, expected: int) -> None:
    assert prefixes_for(needed, free_slots, available=available, max_allocate=max_allocate) == expected


@pytest.mark.parametrize(
    "hypervisor, bare_metal, expected",
    [
        ("nitro", False, True),  # m5.large
        ("xen", False, False),  # c4.large
        (None, True, True),  # m5.metal
        (None, False, False),  # unknown
    ],
)
def test_supports_prefixes(hypervisor: str | None, bare_metal: bool, expected: bool) -> None:
    assert supports_prefixes(hypervisor, bare_metal) == expected


@pytest.mark.parametrize(
    "interfaces, slots, first_index, prefixes, expected",
    [
        (3, 10, 0, True, 432),  # m5.large in prefix mode: (3 − 0) × (10 − 1) × 16
        (3, 10, 0, False, 27),  # the same with single addresses
        (3, 10, 1, True, 288),
        (3, 10, 1, False, 18),
        (0, 10, 0, True, 0),  # limits unknown
        (3, 0, 0, False, 0),
    ],
)
def test_max_allocatable_ipv4(interfaces: int, slots: int, first_index: int, prefixes: bool, expected: int) -> None:
    assert max_allocatable_ipv4(interfaces, slots, first_index, prefixes=prefixes) == expected


@pytest.mark.parametrize(
    "used_single, used_per_prefix, expected",
    [
        (0, [], 0),
        (3, [], 3),  # single addresses count one each
        (0, [0, 0], 0),  # a prefix with nothing in use counts nothing
        (0, [1], 16),  # one address in use holds the whole prefix
        (0, [16], 16),
        (2, [1, 0, 15], 34),
        (5, [3, 3, 3], 53),
    ],
)
def test_used_with_prefixes(used_single: int, used_per_prefix: list[int], expected: int) -> None:
    assert used_with_prefixes(used_single, used_per_prefix) == expected


@pytest.mark.parametrize(
    "available, used, cooling, pre_allocate, stranded, expected",
    [
        (32, 0, 0, 0, 0, 32),  # two free prefixes: both are excess
        (32, 1, 0, 0, 15, 16),  # one address in use: its prefix counts whole, only the other is excess
        (32, 17, 0, 0, 15, 0),  # both in use
        (32, 1, 0, 8, 15, 8),  # pre_allocate still counts in addresses
        (34, 1, 0, 0, 15, 18),  # two single addresses beside the prefixes
        (32, 1, 3, 0, 15, 13),  # cooling addresses of the prefix in use count twice: a later release
    ],
)
def test_pool_excess_with_prefixes(
    available: int, used: int, cooling: int, pre_allocate: int, stranded: int, expected: int
) -> None:
    counts = PoolCounts(available, used, cooling)
    assert pool_excess_with_prefixes(counts, Watermarks(pre_allocate=pre_allocate), stranded) == expected


def test_the_stranded_count_gives_cilium_s_used_count() -> None:
    # Prefixes with 1, 0 and 15 addresses in use, 2 single addresses in use.
    used_per_prefix, used_single = [1, 0, 15], 2
    used = used_single + sum(used_per_prefix)
    stranded = sum(16 - u for u in used_per_prefix if u > 0)
    assert used + stranded == used_with_prefixes(used_single, used_per_prefix)
