"""Prefix-delegation arithmetic, table-driven."""

from __future__ import annotations

import pytest

from services.core.prefixes import prefix_capacity, prefixes_for, supports_prefixes


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
