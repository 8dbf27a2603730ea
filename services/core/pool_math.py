"""Pool-maintenance arithmetic (Cilium's `calculateNeededIPs` / `calculateExcessIPs`).

Pure functions, no I/O: the allocator uses them to decide when to publish a deficit or excess
event, the worker's planner to decide how much to allocate or release.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_PRE_ALLOCATE = 8


@dataclass(frozen=True, slots=True)
class Watermarks:
    """A node's pool-sizing parameters, Cilium's ENI spec fields: pre-allocate, min-allocate,
    max-allocate and max-above-watermark."""

    pre_allocate: int = DEFAULT_PRE_ALLOCATE
    min_allocate: int = 0
    max_allocate: int = 0
    max_above_watermark: int = 0


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """What a pool holds right now.

    `available` counts every address attached to the node in this pool (free, allocated,
    excluded); `used` the allocated and excluded ones; `cooling` the free ones still in the reuse
    cooldown, which cannot be handed out yet and so do not count towards the free headroom.
    """

    available: int
    used: int
    cooling: int = 0


def needed_ips(available: int, used: int, w: Watermarks) -> int:
    """How many addresses to add so that `pre_allocate` are free (bounded by min/max allocate)."""
    needed = w.pre_allocate - (available - used)
    if w.min_allocate > 0:
        needed = max(needed, w.min_allocate - available)
    if w.max_allocate > 0 and available + needed > w.max_allocate:
        needed = w.max_allocate - available
    return max(needed, 0)


def excess_ips(available: int, used: int, w: Watermarks) -> int:
    """How many free addresses exceed the watermark and may be given back to the cloud."""
    ceiling = w.min_allocate + w.max_above_watermark
    if used <= ceiling and available <= ceiling:
        return 0
    return max(available - used - w.pre_allocate - w.max_above_watermark, 0)


def pool_needed_ips(counts: PoolCounts, w: Watermarks) -> int:
    """`needed_ips` where addresses in the reuse cooldown do not count as free headroom.

    Counting cooling addresses as free is the AWS VPC CNI's bug #2896: a pool full of cooling
    addresses looked healthy while new pods starved. Here a refill is requested instead.
    """
    return needed_ips(counts.available - counts.cooling, counts.used, w)


def pool_excess_ips(counts: PoolCounts, w: Watermarks) -> int:
    """`excess_ips` where cooling addresses count neither as headroom nor as excess: counting
    them as excess would release usable addresses while the cooling ones make a deficit, and the
    worker would give back and take again the same addresses until the cooldown ends."""
    return excess_ips(counts.available - counts.cooling, counts.used, w)


def pool_surge_needed_ips(counts: PoolCounts, w: Watermarks, waiting: int = 0) -> int:
    """`pool_needed_ips` with the callers waiting (Cilium's surge) counted as used: the watermark's
    need plus the waiters the free addresses do not cover. Free addresses are taken by waiters first
    (a refill just added still has its waiters counted until they wake): counting those waiters on
    top would ask for their addresses twice (a whole second /28 each time in prefix mode).
    max_allocate is the caller's to apply (a cap here would hide waiters it stops)."""
    uncapped = replace(w, max_allocate=0)
    return pool_needed_ips(PoolCounts(counts.available, counts.used + max(waiting, 0), counts.cooling), uncapped)


def pool_demand_ips(counts: PoolCounts, w: Watermarks, waiting: int = 0) -> int:
    """What a refill must bring: the watermark's need plus the callers waiting that the free
    addresses do not cover (`pool_surge_needed_ips`), never beyond max_allocate. 0 means no refill
    is coming, whoever waits."""
    demand = pool_surge_needed_ips(counts, w, waiting)
    if w.max_allocate > 0:
        demand = min(demand, w.max_allocate - counts.available)
    return max(demand, 0)


def interface_capacity(max_interfaces: int, ipv4_per_interface: int, first_interface_index: int) -> int:
    """Usable addresses of an instance: the primary address of each interface is never handed out."""
    if max_interfaces <= 0 or ipv4_per_interface <= 0:
        return 0
    return max(max_interfaces - first_interface_index, 0) * max(ipv4_per_interface - 1, 0)
