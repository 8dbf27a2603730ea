"""The watermark arithmetic, table-driven (Cilium's `pkg/ipam/node_test.go` cases first)."""

from __future__ import annotations

import pytest

from services.core.pool_math import (
    PoolCounts,
    Watermarks,
    excess_ips,
    interface_capacity,
    needed_ips,
    pool_demand_ips,
    pool_excess_ips,
    pool_needed_ips,
)

# available, used, pre_allocate, min_allocate, max_allocate, expected needed
NEEDED = [
    # Cilium's table
    (0, 0, 0, 16, 0, 16),
    (0, 0, 8, 16, 0, 16),
    (0, 0, 16, 8, 0, 16),
    (0, 0, 16, 0, 0, 16),
    (8, 0, 0, 16, 0, 8),
    (8, 4, 8, 0, 0, 4),
    (8, 4, 8, 8, 0, 4),
    (8, 4, 8, 8, 6, 0),
    (8, 4, 8, 0, 8, 0),
    (4, 4, 8, 0, 8, 4),
    # ours
    (0, 0, 8, 0, 0, 8),  # a new node fills to its watermark
    (8, 8, 8, 0, 0, 8),  # every address used: a whole watermark again
    (20, 2, 8, 0, 0, 0),  # plenty free
    (10, 9, 8, 0, 12, 2),  # max_allocate caps the refill
    (12, 12, 8, 0, 12, 0),  # at max_allocate: nothing more
    (0, 0, 0, 0, 0, 0),  # pre_allocate 0 and nothing in use
]

# available, used, pre_allocate, min_allocate, max_above_watermark, expected excess
EXCESS = [
    # Cilium's table
    (0, 0, 0, 16, 0, 0),
    (15, 0, 8, 16, 8, 0),
    (17, 0, 8, 16, 0, 9),
    (20, 0, 8, 16, 4, 0),
    (21, 0, 8, 0, 4, 9),
    (20, 0, 8, 20, 8, 0),
    (16, 1, 8, 16, 8, 0),
    (20, 4, 8, 17, 8, 0),
    (20, 4, 8, 0, 0, 8),
    (20, 4, 8, 0, 8, 0),
    # ours
    (27, 27, 8, 0, 0, 0),  # everything in use
    (27, 0, 8, 0, 0, 19),  # everything released: back down to the watermark
]


@pytest.mark.parametrize("available,used,pre,min_a,max_a,expected", NEEDED)
def test_needed_ips(available: int, used: int, pre: int, min_a: int, max_a: int, expected: int) -> None:
    assert needed_ips(available, used, Watermarks(pre, min_a, max_a, 0)) == expected


@pytest.mark.parametrize("available,used,pre,min_a,maw,expected", EXCESS)
def test_excess_ips(available: int, used: int, pre: int, min_a: int, maw: int, expected: int) -> None:
    assert excess_ips(available, used, Watermarks(pre, min_a, 0, maw)) == expected


# counts (available, used, cooling), expected needed, expected excess; pre_allocate 8
COOLING = [
    ((16, 8, 0), 0, 0),
    ((16, 8, 8), 8, 0),  # 8 free but all cooling: a refill is needed (VPC CNI #2896)
    ((16, 8, 4), 4, 0),
    ((30, 0, 20), 0, 2),  # cooling addresses are neither headroom nor excess
    ((16, 0, 8), 0, 0),  # 8 usable free = the watermark: no churn while 8 cool
    ((30, 0, 0), 0, 22),
]


@pytest.mark.parametrize("counts,expected_needed,expected_excess", COOLING)
def test_cooling_addresses_are_not_headroom(
    counts: tuple[int, int, int], expected_needed: int, expected_excess: int
) -> None:
    pool = PoolCounts(*counts)
    assert pool_needed_ips(pool, Watermarks()) == expected_needed
    assert pool_excess_ips(pool, Watermarks()) == expected_excess


# max interfaces, IPv4 per interface, first interface index, usable addresses
CAPACITY = [
    (3, 10, 0, 27),  # m5.large
    (4, 15, 0, 56),  # c5.xlarge
    (2, 4, 0, 6),  # a1.medium
    (3, 10, 1, 18),  # m5.large, eth0 kept for the host
    (0, 10, 0, 0),  # limits unknown
]


@pytest.mark.parametrize("adapters,per_interface,first_index,expected", CAPACITY)
def test_interface_capacity(adapters: int, per_interface: int, first_index: int, expected: int) -> None:
    assert interface_capacity(adapters, per_interface, first_index) == expected


@pytest.mark.parametrize(
    ("available", "used", "waiting", "max_a", "expected"),
    [
        (0, 0, 20, 0, 28),  # nothing free: the waiters and the watermark
        (8, 8, 3, 0, 11),
        (32, 0, 20, 0, 0),  # a refill just came: its waiters, not yet woken, take 20 of its 32
        (20, 0, 20, 0, 8),  # they take all of it: the watermark is still missing
        (16, 0, 20, 24, 8),  # never beyond max_allocate
        (4, 0, 0, 0, 4),  # no waiters: the watermark alone
    ],
)
def test_pool_demand_counts_waiters_as_used(available: int, used: int, waiting: int, max_a: int, expected: int) -> None:
    w = Watermarks(pre_allocate=8, max_allocate=max_a)
    assert pool_demand_ips(PoolCounts(available, used), w, waiting) == expected
