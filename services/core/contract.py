"""The Redis contract between the allocator and the worker: the events stream, its consumer group
and dead-letter stream, and the keys both processes touch. Every key of one node shares the hash tag
`{node}`, so each Lua script touches one cluster slot and the design runs unchanged on Redis Cluster."""

from __future__ import annotations

EVENTS_STREAM = "ipam:events"  # the allocator publishes here, the worker consumes
DEAD_LETTER_STREAM = "ipam:events:dead"  # events the worker gave up on after too many deliveries
CONSUMER_GROUP = "ipam-workers"  # the worker's default consumer group on EVENTS_STREAM
WORKER_HEARTBEATS = "ipam:workers:heartbeats"  # workers by heartbeat deadline (core/liveness.py)


def node_prefix(node: str) -> str:
    """The common prefix (and cluster hash tag) of every key of one node."""
    return f"ipam:{{{node}}}"


def node_key(node: str) -> str:
    """The node's hash: its spec and settings (the allocator's), and in its field `fence` the newest
    fencing token of the node's lock, raised by the worker that takes the lock and checked by the
    allocator's scripts on each of the worker's changes."""
    return f"{node_prefix(node)}:node"


def pending_event_key(node: str, pool: str) -> str:
    """Coalescing marker: set while an event for (node, pool) waits in the stream. The allocator
    sets it when it publishes; the worker deletes it when it takes the event."""
    return f"{node_prefix(node)}:{pool}:evpending"
