"""Node statistics (Cilium's `Statistics` of a node, pkg/ipam/node.go): pure computation from what
the store holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.core.pool_math import PoolCounts, Watermarks, pool_excess_ips, pool_needed_ips
from services.core.prefixes import max_allocatable_ipv4, pool_excess_with_prefixes

from .pool import NodeInterface


@dataclass(frozen=True, slots=True)
class NodeStats:
    used_ips: int
    available_ips: int
    needed_ipv4: int
    excess_ipv4: int
    remaining_interfaces: int
    interface_candidates: int
    empty_interface_slots: int
    cooling_ips: int
    used_ipv6: int
    available_ipv6: int
    needed_ipv6: int
    waiting_ipv4: int = 0  # callers waiting for an IPv4 refill
    waiting_ipv6: int = 0  # callers waiting for an IPv6 refill
    excess_ipv6: int = 0
    lost_ips: int = 0  # allocated, but gone from the cloud
    reserved_ips: int = 0  # reserved for release by the worker (both families)
    excluded_ips: int = 0  # never handed out (both families)
    max_allocatable_ipv4: int = 0  # the instance's IPv4 addresses for pods (0 while its limits are unknown)
    ipv4_prefixes: int = 0  # IPv4 /28 prefixes the pool holds


def node_stats(
    v4: PoolCounts,
    v6: PoolCounts,
    watermarks: Watermarks,
    *,
    ipv6_enabled: bool,
    interfaces: Sequence[NodeInterface],
    max_interfaces: int,
    ipv4_per_interface: int,
    first_interface_index: int,
    waiting_ipv4: int = 0,
    waiting_ipv6: int = 0,
    lost_ips: int = 0,
    reserved: int = 0,
    excluded: int = 0,
    prefixes: int = 0,
    stranded: int = 0,
    ipv6_prefix: bool = False,
) -> NodeStats:
    """Cilium's statistics for one pool of a node; interface figures are 0 while limits are unknown.
    A pool holding `prefixes` is in prefix mode: its capacity counts 16 addresses a slot, and its
    excess counts a prefix with any address in use as wholly used (`stranded`: the free addresses of
    such prefixes). A pool holding an IPv6 /80 (`ipv6_prefix`) needs no IPv6 and has no IPv6 excess:
    the prefix does not run dry, and goes back to the cloud only whole."""
    used_devices = {i.device_index for i in interfaces}
    empty_slots = sum(1 for d in range(first_interface_index, max(max_interfaces, 0)) if d not in used_devices)
    candidates = 0
    if ipv4_per_interface > 0:
        candidates = sum(
            1
            for i in interfaces
            if i.device_index >= first_interface_index and i.ipv4_slots_used() < ipv4_per_interface - 1
        )
    if ipv6_prefix:
        excess6 = 0
    elif ipv6_enabled:
        excess6 = pool_excess_ips(v6, watermarks)
    else:  # IPv6 switched off: every free IPv6 address is excess, to be given back to the cloud
        excess6 = max(v6.available - v6.used, 0)
    return NodeStats(
        used_ips=v4.used,
        available_ips=v4.available,
        needed_ipv4=pool_needed_ips(v4, watermarks),
        excess_ipv4=pool_excess_with_prefixes(v4, watermarks, stranded),
        # Cilium's definition: interfaces that can still take addresses, attached or not yet.
        remaining_interfaces=candidates + empty_slots,
        interface_candidates=candidates,
        empty_interface_slots=empty_slots,
        cooling_ips=v4.cooling,
        used_ipv6=v6.used,
        available_ipv6=v6.available,
        needed_ipv6=pool_needed_ips(v6, watermarks) if ipv6_enabled and not ipv6_prefix else 0,
        excess_ipv6=excess6,
        waiting_ipv4=waiting_ipv4,
        waiting_ipv6=waiting_ipv6,
        lost_ips=lost_ips,
        reserved_ips=reserved,
        excluded_ips=excluded,
        max_allocatable_ipv4=max_allocatable_ipv4(
            max_interfaces, ipv4_per_interface, first_interface_index, prefixes=prefixes > 0
        ),
        ipv4_prefixes=prefixes,
    )
