"""Prefix-delegation arithmetic: an IPv4 /28 prefix takes one address slot of an interface, as a
secondary address does, and brings 16 addresses instead of one.

Pure functions, no I/O, for the worker's planner and the allocator's statistics.
"""

from __future__ import annotations

from services.core.pool_math import interface_capacity

ADDRESSES_PER_PREFIX = 16  # an IPv4 /28


def prefix_capacity(max_interfaces: int, ipv4_per_interface: int, first_interface_index: int) -> int:
    """Addresses an instance holds when every slot but each interface's primary holds a prefix:
    (interfaces − first interface index) × (slots − 1) × 16."""
    return interface_capacity(max_interfaces, ipv4_per_interface, first_interface_index) * ADDRESSES_PER_PREFIX


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
