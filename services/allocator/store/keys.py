"""The allocator's Redis key names. Every key of one node shares the hash tag `{node}`, so each Lua
script touches one cluster slot and the design runs unchanged on Redis Cluster. The keys the worker
touches too are in `services.core.contract`."""

from __future__ import annotations

import functools

from services.core.contract import node_key, node_prefix, pending_event_key

NODES_KEY = "ipam:nodes"  # set of node names (its own slot; written outside pool scripts)
TIMERS_KEY = "ipam:timers"  # zset "node\x00pool" -> next expiration deadline (ms), an index
REFILL_CHANNEL = "ipam:refill"  # pub/sub: "node\x00pool" when addresses were added


def pools_key(node: str) -> str:
    return f"{node_prefix(node)}:pools"


def interfaces_key(node: str) -> str:
    return f"{node_prefix(node)}:ifaces"


def interface_info_key(node: str) -> str:
    """interface id -> "mac\tdevice index\tgateway\tsubnet cidr\tIPv6 gateway\tIPv6 subnet cidr": what an
    allocation result needs, kept small."""
    return f"{node_prefix(node)}:ifinfo"


@functools.lru_cache(maxsize=4096)
def pool_keys(node: str, pool: str) -> tuple[str, ...]:
    """The KEYS every pool script receives, in the order `lua/_lib.lua` reads them (kept for the
    pools in use: every call of a pool passes the same 23 names)."""
    p = f"{node_prefix(node)}:{pool}"
    return (
        node_key(node),
        pools_key(node),
        interfaces_key(node),
        f"{p}:free:4",
        f"{p}:free:6",
        f"{p}:addrs:4",
        f"{p}:addrs:6",
        f"{p}:alloc:4",
        f"{p}:alloc:6",
        f"{p}:owners",
        f"{p}:idem",
        f"{p}:excluded",
        f"{p}:reserved:4",
        f"{p}:reserved:6",
        f"{p}:resv",
        f"{p}:exp",
        pending_event_key(node, pool),
        interface_info_key(node),
        f"{p}:waiting",
        f"{p}:lost",
        f"{p}:prefixes:4",
        f"{p}:pfree:4",
        f"{p}:prefix6",
    )


def pool_key(node: str, pool: str, name: str) -> str:
    """One key of a pool by its short name (e.g. "alloc:4"), for reads outside scripts."""
    return f"{node_prefix(node)}:{pool}:{name}"


def node_pool(node: str, pool: str) -> str:
    """(node, pool) as one string: a member of the timer index, a message on the refill channel."""
    return f"{node}\x00{pool}"


def split_node_pool(member: str) -> tuple[str, str]:
    node, _, pool = member.partition("\x00")
    return node, pool
