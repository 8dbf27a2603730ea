"""What the allocator's service asks of its store: the seam between the use cases and Redis, so the
service can be tested against a fake. Every change is atomic per (node, pool); failures are the
domain's exceptions (`PoolEmpty` carries the pool's state)."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from random import getrandbits
from typing import Protocol

from services.core.family import Family

from ..domain.pool import (
    AllocateOutcome,
    ChangeOutcome,
    CloudFacts,
    KeyedAllocation,
    NodeInterface,
    NodeRecord,
    NodeSettings,
    PoolDump,
    PoolState,
    RemoveOutcome,
    Replication,
)

# Keys the allocator makes for calls that came without one. Callers' keys are printable, so they
# never start with this; such keys are shown as "" (`keyed_allocations`).
CALL_KEY_PREFIX = "\x1fcall-"


def call_key() -> str:
    """A key of the allocator's own for one call made without an idempotency key: 128 random bits
    in hex. They need to be unique, not secret (clients cannot send the prefix): `random`'s
    generator, seeded from os.urandom and again in each forked worker, costs a third of a
    getrandom() system call per key."""
    return CALL_KEY_PREFIX + getrandbits(128).to_bytes(16).hex()


class CallScope:
    """One caller's bounds on the store: the monotonic time by which the store must have answered.
    Store calls made while it is entered (`with`) are bounded by it."""

    __slots__ = ("deadline", "_token")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __enter__(self) -> CallScope:
        self._token = _SCOPE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _SCOPE.reset(self._token)


_SCOPE: ContextVar[CallScope | None] = ContextVar("ipam_store_call_scope", default=None)


def current_call_scope() -> CallScope | None:
    """The scope of the store call being made, if any."""
    return _SCOPE.get()


class PoolStore(Protocol):
    """Pools, allocations, owners, timers and node records."""

    # --- allocation ----------------------------------------------------------------------------

    async def allocate_next(
        self, node: str, pool: str, families: Sequence[Family], owner: str, idempotency_key: str, expiration_s: int
    ) -> AllocateOutcome:
        """One address of each family, all or none; a key used before replays its addresses."""
        ...

    async def allocate(self, node: str, pool: str, ip: str, owner: str, idempotency_key: str = "") -> AllocateOutcome:
        """That address, if it is free in the pool."""
        ...

    async def cancel_call(self, node: str, pool: str, key: str) -> ChangeOutcome:
        """Gives back what the call under `key` took, or makes it take nothing should it still run."""
        ...

    async def release(self, node: str, pool: str, *, ip: str | None = None, owner: str | None = None) -> ChangeOutcome:
        """Releases one address, or every address of an owner."""
        ...

    async def release_by_key(self, node: str, pool: str, idempotency_key: str) -> ChangeOutcome: ...

    async def keyed_allocations(self, node: str, pool: str, key_prefix: str = "") -> list[KeyedAllocation]: ...

    async def exclude(self, node: str, pool: str, ip: str, owner: str) -> ChangeOutcome: ...

    # --- timers and waiting callers -------------------------------------------------------------

    async def start_timer(self, node: str, pool: str, ip: str, timeout_s: int) -> str:
        """Starts (or restarts) the address's expiration timer; its uuid."""
        ...

    async def stop_timer(self, node: str, pool: str, ip: str, expiration_uuid: str) -> None: ...

    async def expire_due(self, node: str, pool: str, batch: int = 500) -> ChangeOutcome:
        """Releases the addresses whose timer is due; `next_ms` is the next deadline (0 = none)."""
        ...

    async def due_timers(self, now_ms: int, limit: int = 100) -> list[tuple[str, str]]: ...

    async def reindex_timer(self, node: str, pool: str, next_ms: int) -> None: ...

    async def next_timer_deadline(self, node: str, pool: str) -> int: ...

    def waiter_id(self, family: Family, call_id: str) -> str:
        """The id under which a caller waiting for a refill of `family` is counted."""
        ...

    async def add_waiter(self, node: str, pool: str, call_id: str, deadline_ms: int) -> None: ...

    async def remove_waiter(self, node: str, pool: str, call_id: str) -> None: ...

    # --- reads -----------------------------------------------------------------------------------

    async def pool_state(self, node: str, pool: str) -> PoolState: ...

    async def dump(self, node: str, pool: str) -> PoolDump:
        """Allocated addresses (ip -> owner) and free addresses per family, and the pool's subnets."""
        ...

    async def node_names(self) -> list[str]: ...

    async def replication(self) -> Replication:
        """Where changes are written, and how many replicas hold them."""
        ...

    async def pool_names(self, node: str) -> list[str]: ...

    async def vpc_cidrs(self, node: str) -> list[str]: ...

    async def node_record(self, node: str, pool: str = "default") -> NodeRecord: ...

    # --- nodes and the worker's reports ------------------------------------------------------------

    async def put_node(self, node: str, spec: bytes, settings: NodeSettings, *, create: bool) -> None:
        """Creates the node (`create`) or replaces the spec of a known one."""
        ...

    async def delete_node(self, node: str) -> None: ...

    # The worker's changes carry the fencing token of its node lock (`fence`, 0 = none): one below
    # the node's newest is refused with STALE_FENCING_TOKEN and changes nothing.

    async def add_addresses(
        self,
        node: str,
        pool: str,
        interface: NodeInterface,
        ips: Sequence[str],
        facts: CloudFacts,
        *,
        fence: int = 0,
        prefixes: Sequence[str] = (),
    ) -> ChangeOutcome: ...

    async def set_interfaces(
        self,
        node: str,
        interfaces: Sequence[NodeInterface],
        facts: CloudFacts,
        deficit_reason: str,
        *,
        fence: int = 0,
    ) -> None: ...

    async def set_node_error(self, node: str, error: str) -> None: ...

    async def reserve_for_release(
        self,
        node: str,
        pool: str,
        family: Family,
        interface_id: str,
        count: int,
        *,
        fence: int = 0,
        prefix: str = "",
    ) -> ChangeOutcome: ...

    async def complete_release(
        self, node: str, pool: str, reservation_id: str, ips: Sequence[str], *, fence: int = 0
    ) -> ChangeOutcome: ...

    async def abort_release(self, node: str, pool: str, reservation_id: str, *, fence: int = 0) -> ChangeOutcome: ...

    async def remove_addresses(
        self, node: str, pool: str, ips: Sequence[str], *, fence: int = 0, prefixes: Sequence[str] = ()
    ) -> RemoveOutcome: ...
