"""Prefix-delegation arithmetic: an IPv4 /28 prefix takes one address slot of an interface, as a
secondary address does, and brings 16 addresses instead of one.

Pure functions, no I/O, for the worker's planner and the allocator's statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.core.pool_math import PoolCounts, Watermarks, interface_capacity, pool_excess_ips

ADDRESSES_PER_PREFIX = 16  # an IPv4 /28


def prefix_capacity(max_interfaces: int, ipv4_per_interface: int, first_interface_index: int) -> int:
    """Addresses an instance holds when every slot but each interface's primary holds a prefix:
    (interfaces − first interface index) × (slots − 1) × 16."""
    return interface_capacity(max_interfaces, ipv4_per_interface, first_interface_index) * ADDRESSES_PER_PREFIX


def max_allocatable_ipv4(
    max_interfaces: int, ipv4_per_interface: int, first_interface_index: int, *, prefixes: bool
) -> int:
    """The IPv4 addresses an instance can hold in pools: every slot but each interface's primary
    holding a prefix when the pool is in prefix mode, one secondary address otherwise (0 while the
    limits are unknown)."""
    if prefixes:
        return prefix_capacity(max_interfaces, ipv4_per_interface, first_interface_index)
    return interface_capacity(max_interfaces, ipv4_per_interface, first_interface_index)


def used_with_prefixes(used_single: int, used_per_prefix: Iterable[int]) -> int:
    """Used addresses counted as Cilium's GetUsedIPWithPrefixes counts them for excess: a prefix with
    at least one address in use counts as 16 used, since only a prefix with none can be given back.
    `used_single`: used addresses outside prefixes; `used_per_prefix`: each prefix's used addresses."""
    return used_single + sum(ADDRESSES_PER_PREFIX for used in used_per_prefix if used > 0)


def pool_excess_with_prefixes(counts: PoolCounts, w: Watermarks, stranded: int) -> int:
    """`pool_excess_ips` with the used addresses of `used_with_prefixes`: `stranded` are the free
    addresses of prefixes with an address in use (so used + stranded counts each such prefix whole).
    A cooling address of such a prefix then counts both as used and as not free, which only delays a
    release until it has cooled."""
    return pool_excess_ips(PoolCounts(counts.available, counts.used + max(stranded, 0), counts.cooling), w)


def prefixes_for(needed: int, free_slots: int, *, available: int = 0, max_allocate: int = 0) -> int:
    """How many prefixes cover a deficit of `needed` addresses: ⌈needed / 16⌉, no more than the
    interface's `free_slots`, and with `max_allocate` set no more than cover what is left below it
    (⌈(max_allocate − available) / 16⌉). A prefix comes whole, so the last one may take the node up
    to 15 addresses past max_allocate; rounding down instead would leave a deficit under 16
    unserved for good."""
    prefixes = _whole_prefixes(needed)
    if max_allocate > 0:
        prefixes = min(prefixes, _whole_prefixes(max_allocate - available))
    return max(min(prefixes, free_slots), 0)


def supports_prefixes(hypervisor: str | None, bare_metal: bool = False) -> bool:
    """Whether an instance type takes prefixes (EC2 delegates them to Nitro instances only), from
    DescribeInstanceTypes' Hypervisor and BareMetal: bare-metal types name no hypervisor."""
    return hypervisor == "nitro" or bare_metal


def _whole_prefixes(addresses: int) -> int:
    """⌈addresses / 16⌉, 0 for none."""
    return -(-max(addresses, 0) // ADDRESSES_PER_PREFIX)
