"""The allocator's use cases: validate, run the store's script, publish an event when the pool
needs work. Speaks domain types only; the gRPC servicer translates to and from protobuf."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.core.family import Family
from services.core.pool_math import pool_demand_ips, pool_excess_ips
from services.core.prefixes import ADDRESSES_PER_PREFIX, pool_excess_with_prefixes
from services.core.reasons import DeficitReason, ErrorReason

from .domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    IpamError,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from .domain.model import (
    DEFAULT_POOL,
    MAX_KEY_LENGTH,
    MAX_OWNER_LENGTH,
    Allocation,
    check_inside_vpc,
    check_subnet,
    parse_cidrs,
    parse_ip,
    parse_ipv6_80,
    parse_ipv6_prefix,
    parse_prefix,
    parse_prefixes,
    pool_or_default,
    validate_fence,
    validate_name,
    validate_page_size,
    validate_spec_items,
    validate_text,
    validate_timeout,
)
from .domain.pool import (
    CloudFacts,
    EventKind,
    KeyedAllocation,
    NodeInterface,
    NodeRecord,
    NodeSettings,
    PoolDump,
    PoolEmpty,
    PoolEvent,
    PoolState,
    RemoveOutcome,
    Replication,
    Reservation,
)
from .domain.stats import NodeStats, node_stats
from .events import Consumer, DeadLetter, EventQueue
from .metrics import AllocatorMetrics
from .refill import Refills
from .store.base import PoolStore, call_key

__all__ = ["AllocatorService", "NodeSettings", "NodeView"]

log = logging.getLogger(__name__)
NODE_VIEW_CHUNK = 50  # nodes whose views are read at once

_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
# Of a waiting caller's deadline, what is kept to ask the store again after the wait.
_ASK_AGAIN_S = 0.05
# An empty pool's reasons worth waiting for: a refill is under way, or the cooldown ends.
_REFILL_MAY_COME = (ErrorReason.POOL_EMPTY, ErrorReason.POOL_COOLING_DOWN)


@dataclass(frozen=True, slots=True)
class NodeView:
    record: NodeRecord
    stats: NodeStats
    reservations: list[Reservation]


class AllocatorService:
    """Allocation and node management over the Redis store."""

    def __init__(
        self,
        store: PoolStore,
        queue: EventQueue,
        refills: Refills | None,
        *,
        ipv4_enabled: bool,
        ipv6_enabled: bool,
        metrics: AllocatorMetrics | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.refills = refills
        self.ipv4_enabled = ipv4_enabled
        self.ipv6_enabled = ipv6_enabled
        self.metrics = metrics
        self._rollbacks: set[asyncio.Task[None]] = set()

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _target(node: str, pool: str) -> tuple[str, str]:
        return validate_name(node, "node"), validate_name(pool_or_default(pool), "pool")

    def _check_family_enabled(self, family: Family) -> None:
        if family is Family.IPV4 and not self.ipv4_enabled:
            raise FailedPrecondition("IPv4 is disabled on this allocator", reason=ErrorReason.IPV4_DISABLED)
        if family is Family.IPV6 and not self.ipv6_enabled:
            raise FailedPrecondition("IPv6 is disabled on this allocator", reason=ErrorReason.IPV6_DISABLED)

    def _families(self, family: Family) -> list[Family]:
        if family is Family.UNSPECIFIED:
            # Dual-stack: both enabled families, taken together or not at all (IPv6 first, as Cilium).
            chosen = [f for f, on in ((Family.IPV6, self.ipv6_enabled), (Family.IPV4, self.ipv4_enabled)) if on]
            if not chosen:
                raise FailedPrecondition("no address family is enabled", reason=ErrorReason.IPV4_DISABLED)
            return chosen
        self._check_family_enabled(family)
        return [family]

    async def publish_if_needed(
        self, node: str, pool: str, state: PoolState | None, *, skip_sync_upstream: bool = False
    ) -> bool:
        """Publishes one (coalesced) event when the pool is below or above its watermark; True if it
        did. No state: the store found that the change needs no event."""
        if state is None or skip_sync_upstream or state.event_pending:
            return False
        needed, excess = pool_work(state)
        if needed <= 0 and excess <= 0:
            return False
        kind = EventKind.DEFICIT if needed > 0 else EventKind.EXCESS
        event = PoolEvent(node, pool, kind)
        try:
            published = await self.queue.publish_once(event)
        except (Unavailable, OutcomeUnknown) as exc:
            # The change itself is done: failing the call now would tell its caller it was not. The
            # worker's periodic resync finds the deficit or excess this event would have announced.
            log.warning("event for %s/%s not published: %s", node, pool, exc.message)
            return False
        if published and self.metrics is not None:
            self.metrics.events_published.labels(kind=f"KIND_{kind.name}").inc()
        return published

    # --- Allocator --------------------------------------------------------------------------

    async def allocate_next(
        self,
        node: str,
        pool: str,
        family: Family,
        owner: str,
        *,
        expiration_seconds: int = 0,
        skip_sync_upstream: bool = False,
        idempotency_key: str = "",
        wait_for_refill: bool = False,
        deadline: float | None = None,
    ) -> list[Allocation]:
        node, pool = self._target(node, pool)
        owner = validate_text(owner, "owner", MAX_OWNER_LENGTH, required=True)
        idempotency_key = validate_text(idempotency_key, "idempotency key", MAX_KEY_LENGTH, required=False)
        expiration_seconds = validate_timeout(expiration_seconds, "expiration_seconds")
        families = self._families(family)
        own_key = not idempotency_key
        idempotency_key = idempotency_key or call_key()  # so that a lost try can be found and given back
        waiter = ""  # set while this call is counted among the callers waiting for a refill
        last_empty: PoolEmpty | None = None  # the pool's answer before the last wait
        try:
            while True:
                try:
                    outcome = await self.store.allocate_next(
                        node, pool, families, owner, idempotency_key, expiration_seconds
                    )
                except OutcomeUnknown as exc:
                    raise self._given_back(exc, node, pool, idempotency_key) if own_key else exc from exc
                except Unavailable as exc:
                    if last_empty is not None and exc.final:
                        # Asking again after a wait, the deadline left Redis no time to answer, and
                        # nothing was sent: what the pool last said is still the truthful answer.
                        raise last_empty from exc
                    raise
                except PoolEmpty as exc:
                    last_empty = exc
                    state = exc.state
                    remaining = (deadline - time.monotonic()) if deadline else 30.0
                    waits = wait_for_refill and remaining > 2 * _ASK_AGAIN_S
                    refills = self.refills if waits and exc.reason in _REFILL_MAY_COME else None
                    if refills is None:
                        await self.publish_if_needed(node, pool, state, skip_sync_upstream=skip_sync_upstream)
                        raise
                    if not waiter:
                        # Counted (for the family it lacks) before the event goes out, so the worker
                        # sizes its step for us too; an IPv6 waiter never makes IPv4 addresses come.
                        waiter = self.store.waiter_id(exc.family, uuid.uuid4().hex)
                        await self.store.add_waiter(node, pool, waiter, int((time.time() + remaining) * 1000))
                        if exc.family is Family.IPV6:
                            state = replace(state, waiting_ipv6=state.waiting_ipv6 + 1)
                        else:
                            state = replace(state, waiting_ipv4=state.waiting_ipv4 + 1)
                    await self.publish_if_needed(node, pool, state, skip_sync_upstream=skip_sync_upstream)
                    # Woken by the refill itself; the timeout only covers a notification lost on the way.
                    # It stops early enough to ask the store once more within the deadline.
                    wait_s = min(remaining - _ASK_AGAIN_S, 5.0)
                    woken = await refills.wait(node, pool, wait_s)
                    if not woken and wait_s < 5.0:
                        # The deadline came without a refill: the pool's reason at once, without that
                        # last trip to Redis (when every waiter's deadline comes together, those trips
                        # make them late); the waiter entry expires by itself now.
                        waiter = ""
                        raise
                    continue
                if not outcome.replayed and outcome.state is not None:  # None: no event needed
                    await self.publish_if_needed(node, pool, outcome.state, skip_sync_upstream=skip_sync_upstream)
                return outcome.allocations
        finally:
            if waiter:
                with contextlib.suppress(IpamError):  # the entry expires at its deadline anyway
                    await self.store.remove_waiter(node, pool, waiter)

    async def allocate(
        self, node: str, pool: str, ip: str, owner: str, *, skip_sync_upstream: bool = False, idempotency_key: str = ""
    ) -> Allocation:
        node, pool = self._target(node, pool)
        owner = validate_text(owner, "owner", MAX_OWNER_LENGTH, required=True)
        idempotency_key = validate_text(idempotency_key, "idempotency key", MAX_KEY_LENGTH, required=False)
        ip, family = parse_ip(ip)
        self._check_family_enabled(family)
        own_key = not idempotency_key
        idempotency_key = idempotency_key or call_key()
        try:
            outcome = await self.store.allocate(node, pool, ip, owner, idempotency_key)
        except OutcomeUnknown as exc:
            raise self._given_back(exc, node, pool, idempotency_key) if own_key else exc from exc
        if not outcome.replayed:
            await self.publish_if_needed(node, pool, outcome.state, skip_sync_upstream=skip_sync_upstream)
        return outcome.allocations[0]

    def _given_back(self, exc: OutcomeUnknown, node: str, pool: str, key: str) -> OutcomeUnknown:
        """A call without a key of its own whose script may still run: what it takes is given back
        in the background once Redis answers, and the caller is told so."""
        # A fresh context: the task must not inherit this call's deadline.
        task = asyncio.create_task(self._cancel_call(node, pool, key), context=contextvars.Context())
        self._rollbacks.add(task)
        task.add_done_callback(self._rollbacks.discard)
        return OutcomeUnknown(
            f"redis did not answer within {exc.metadata.get('waited', '?')} after the allocation was sent; the "
            "call had no idempotency key, so the allocator gives back whatever it took once redis answers "
            "(give a key to get the same address from a retry)"
        )

    async def _cancel_call(self, node: str, pool: str, key: str, give_up_s: float = 600.0) -> None:
        give_up = time.monotonic() + give_up_s
        while True:
            try:
                outcome = await self.store.cancel_call(node, pool, key)
            except NotFound:  # the node or pool went away, and what it held with it
                return
            except (Unavailable, OutcomeUnknown) as exc:  # running it again is the same as once
                if time.monotonic() > give_up:
                    log.error("gave up giving back an unanswered allocation in %s/%s: %s", node, pool, exc.message)
                    return
                await asyncio.sleep(0.5)
                continue
            if outcome.ips:
                log.warning("gave back %s, taken by a call answered OUTCOME_UNKNOWN", " ".join(outcome.ips))
                await self.publish_if_needed(node, pool, outcome.state)
            return

    async def release(
        self,
        node: str,
        pool: str,
        *,
        ip: str | None = None,
        owner: str | None = None,
        skip_sync_upstream: bool = False,
    ) -> list[str]:
        node, pool = self._target(node, pool)
        if ip:
            ip, _ = parse_ip(ip)
            outcome = await self.store.release(node, pool, ip=ip)
        elif owner:
            owner = validate_text(owner, "owner", MAX_OWNER_LENGTH, required=True)
            outcome = await self.store.release(node, pool, owner=owner)
        else:
            raise InvalidArgument("release needs an ip or an owner", reason=ErrorReason.IP_OR_OWNER_REQUIRED)
        await self.publish_if_needed(node, pool, outcome.state, skip_sync_upstream=skip_sync_upstream)
        return outcome.ips

    async def release_by_key(
        self, node: str, pool: str, idempotency_key: str, *, skip_sync_upstream: bool = False
    ) -> list[str]:
        """Releases what was allocated under the key; an empty list when nothing was held."""
        node, pool = self._target(node, pool)
        idempotency_key = validate_text(idempotency_key, "idempotency key", MAX_KEY_LENGTH, required=True)
        outcome = await self.store.release_by_key(node, pool, idempotency_key)
        if outcome.ips:
            await self.publish_if_needed(node, pool, outcome.state, skip_sync_upstream=skip_sync_upstream)
        return outcome.ips

    async def keyed_allocations(self, node: str, pool: str, key_prefix: str = "") -> list[KeyedAllocation]:
        node, pool = self._target(node, pool)
        key_prefix = validate_text(key_prefix, "key prefix", MAX_KEY_LENGTH, required=False)
        return await self.store.keyed_allocations(node, pool, key_prefix)

    async def exclude(self, node: str, pool: str, ip: str, owner: str) -> None:
        node, pool = self._target(node, pool)
        ip, _ = parse_ip(ip)
        owner = validate_text(owner, "owner", MAX_OWNER_LENGTH, required=True)
        outcome = await self.store.exclude(node, pool, ip, owner)
        await self.publish_if_needed(node, pool, outcome.state)

    async def start_timer(self, node: str, pool: str, ip: str, timeout_seconds: int) -> str:
        node, pool = self._target(node, pool)
        ip, _ = parse_ip(ip)
        if validate_timeout(timeout_seconds, "timeout_seconds") == 0:
            raise InvalidArgument("timeout_seconds must be positive", reason=ErrorReason.INVALID_TIMEOUT)
        return await self.store.start_timer(node, pool, ip, timeout_seconds)

    async def stop_timer(self, node: str, pool: str, ip: str, expiration_uuid: str) -> None:
        node, pool = self._target(node, pool)
        ip, _ = parse_ip(ip)
        validate_text(expiration_uuid, "expiration uuid", 64, required=True)
        await self.store.stop_timer(node, pool, ip, expiration_uuid)

    async def dump(self, node: str, pool: str) -> PoolDump:
        return await self.store.dump(*self._target(node, pool))

    async def vpc_cidrs(self, node: str) -> list[str]:
        return await self.store.vpc_cidrs(validate_name(node, "node"))

    async def replication(self) -> Replication:
        """Where the store writes, and how many replicas hold its writes."""
        return await self.store.replication()

    async def debug_status(self) -> str:
        names = await self.store.node_names()
        lines = [
            f"nodes: {len(names)}",
            f"ipv4: {'on' if self.ipv4_enabled else 'off'}, ipv6: {'on' if self.ipv6_enabled else 'off'}",
        ]
        for name, s in await self.pool_stats(names=names[:50]):
            lines.append(f"{name}: used {s.used_ips}/{s.available_ips} needed {s.needed_ipv4} excess {s.excess_ipv4}")
        return "\n".join(lines)

    # --- events (operators) ---------------------------------------------------------------

    async def event_counts(self) -> tuple[int, int]:
        """(events in the stream not yet handled, dead-lettered events kept)."""
        return await self.queue.counts()

    async def event_consumers(self) -> list[Consumer]:
        return await self.queue.consumers()

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        if limit < 0:
            raise InvalidArgument(f"limit {limit} is negative", reason=ErrorReason.INVALID_COUNT)
        return await self.queue.dead_letters(limit or 100)

    async def replay_dead_letters(self, ids: Sequence[str], *, every: bool) -> tuple[list[str], list[str]]:
        """Puts dead letters back on the events stream; `every` for all of them (then no ids)."""
        if every == bool(ids):
            raise InvalidArgument("give dead-letter ids or all, not both or neither", reason=ErrorReason.INVALID_COUNT)
        for dead_id in ids:
            if not _STREAM_ID.fullmatch(dead_id):
                raise InvalidArgument(f"{dead_id!r} is not a stream id (ms-seq)", reason=ErrorReason.INVALID_TEXT)
        return await self.queue.replay(None if every else list(ids))

    # --- NodeManager ------------------------------------------------------------------------

    async def put_node(self, name: str, spec: bytes, settings: NodeSettings, *, create: bool) -> NodeView:
        name = validate_name(name, "node")
        w = settings.watermarks
        for label, value in (
            ("pre_allocate", w.pre_allocate),
            ("min_allocate", w.min_allocate),
            ("max_allocate", w.max_allocate),
            ("max_above_watermark", w.max_above_watermark),
            ("first_interface_index", settings.first_interface_index),
        ):
            if value < 0 or value > 100_000:
                raise InvalidArgument(f"{label} must be between 0 and 100000", reason=ErrorReason.INVALID_SPEC)
        validate_spec_items(settings.spec_items)
        await self.store.put_node(name, spec, settings, create=create)
        state = await self.store.pool_state(name, DEFAULT_POOL)
        await self.publish_if_needed(name, DEFAULT_POOL, state)
        return await self.node_view(name, DEFAULT_POOL, state)

    async def delete_node(self, name: str) -> None:
        await self.store.delete_node(validate_name(name, "node"))

    async def node_view(self, name: str, pool: str, state: PoolState | None = None) -> NodeView:
        """The node with the statistics of `pool` (`state`: as a script just left it, to spare a read)."""
        name, pool = self._target(name, pool)
        if state is None:
            record, state = await asyncio.gather(self.store.node_record(name, pool), self.store.pool_state(name, pool))
        else:
            record = await self.store.node_record(name, pool)
        return NodeView(record, _stats(state, record), record.reservations)

    async def node_views(self, names: Sequence[str] | None = None) -> list[NodeView]:
        names = list(names) if names is not None else await self.store.node_names()
        views: list[NodeView | BaseException] = []
        for start in range(0, len(names), NODE_VIEW_CHUNK):  # bounded: a page of 500 at once starves the pool
            part = names[start : start + NODE_VIEW_CHUNK]
            views += await asyncio.gather(*(self.node_view(n, "") for n in part), return_exceptions=True)
        for v in views:
            if isinstance(v, BaseException) and not isinstance(v, NotFound):
                raise v  # a store that failed: never a list that silently lacks nodes
        return [v for v in views if isinstance(v, NodeView)]  # a node deleted meanwhile is skipped

    async def node_page(self, page_size: int, after: str) -> tuple[list[NodeView], str]:
        """Up to `page_size` nodes (0 = the default) by name, after the name `after` ("" = from the
        first); and the name to continue after ("" when no node follows)."""
        size = validate_page_size(page_size)
        names = sorted(await self.store.node_names())
        start = bisect.bisect_right(names, after) if after else 0
        page = names[start : start + size]
        more = start + size < len(names)
        return await self.node_views(page), (page[-1] if more and page else "")

    async def pool_stats(
        self, pool: str = DEFAULT_POOL, *, names: Sequence[str] | None = None, chunk: int = 100
    ) -> list[tuple[str, NodeStats]]:
        """The pool figures of these nodes (every node by default), without the interface figures: no
        interface table is read, so this is cheap enough to sample every few seconds (`chunk` nodes at a time)."""
        result = []
        names = list(names) if names is not None else await self.store.node_names()
        for start in range(0, len(names), chunk):
            part = names[start : start + chunk]
            states = await asyncio.gather(*(self.store.pool_state(n, pool) for n in part), return_exceptions=True)
            for name, state in zip(part, states, strict=True):
                if isinstance(state, PoolState):  # a node deleted meanwhile is skipped
                    result.append((name, _stats(state)))
        return result

    async def resync(self) -> tuple[int, int]:
        """Re-evaluates every pool of every node; publishes an event where one is needed."""
        published = 0
        names = await self.store.node_names()
        for name in names:
            for pool in await self.store.pool_names(name):
                try:
                    state = await self.store.pool_state(name, pool)
                except NotFound:  # deleted meanwhile
                    continue
                published += await self.publish_if_needed(name, pool, state)
        return len(names), published

    # --- worker-facing ----------------------------------------------------------------------

    def _worker_ips(self, ips: Sequence[str]) -> list[str]:
        return [parse_ip(ip)[0] for ip in ips]

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
        ipv6_prefix: str = "",
    ) -> tuple[Added, NodeView]:
        """Adds what the worker attached (single addresses, IPv4 /28 `prefixes` whose 16 addresses
        enter together, an IPv6 /80 `ipv6_prefix` whose addresses are handed out one by one); returns
        what was new and the node afterwards. `fence` (here and in the worker's other changes): its
        node lock's fencing token, 0 = none."""
        node, pool = self._target(node, pool)
        fence = validate_fence(fence)
        ips = self._worker_ips(ips)
        _check_subnets(interface)
        prefixes = parse_prefixes(prefixes, interface.id, interface.subnet_cidr)
        inside = [ip for ip in ips if any(ipaddress.ip_address(ip) in ipaddress.ip_network(p) for p in prefixes)]
        if inside:
            raise InvalidArgument(
                f"{inside[0]} is sent both alone and inside a prefix", reason=ErrorReason.INVALID_PREFIX
            )
        prefix6 = parse_ipv6_prefix(ipv6_prefix, interface.id, interface.subnet_ipv6_cidr)
        if prefix6:
            prefixes.append(prefix6)
        # Checked against the CIDRs sent along, else the ones the node already has; not atomic with the
        # script, but a node's VPC CIDRs change only by the worker that adds its addresses.
        known = facts.vpc_cidrs or await self.store.vpc_cidrs(node)
        check_inside_vpc(ips + [p.split("/")[0] for p in prefixes], parse_cidrs(known))
        outcome = await self.store.add_addresses(node, pool, interface, ips, facts, fence=fence, prefixes=prefixes)
        new = len(outcome.ips) + ADDRESSES_PER_PREFIX * len(outcome.other_ips)
        if prefix6 in outcome.other_ips:
            new = 0  # a /80 serves every caller waiting
        if (new or outcome.other_ips) and self.refills:
            await self.refills.notify(node, pool, new)
        return Added(outcome.ips, outcome.other_ips), await self.node_view(node, pool, outcome.state)

    async def set_interfaces(
        self,
        node: str,
        interfaces: Sequence[NodeInterface],
        facts: CloudFacts,
        deficit_reason: str,
        *,
        fence: int = 0,
    ) -> None:
        node = validate_name(node, "node")
        for interface in interfaces:
            _check_subnets(interface)
        fence = validate_fence(fence)
        await self.store.set_interfaces(node, interfaces, facts, deficit_reason, fence=fence)
        if deficit_reason and self.refills:
            await self.refills.notify(node, "")  # waiters learn the node cannot be refilled

    async def set_node_error(self, node: str, error: str) -> None:
        node = validate_name(node, "node")
        await self.store.set_node_error(node, validate_text(error, "error", 2000, required=False))

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
    ) -> tuple[str, list[str]]:
        """Reserves up to `count` free single addresses of `family`, or the IPv4 /28 `prefix` whole."""
        node, pool = self._target(node, pool)
        if count < 0:
            raise InvalidArgument("count must not be negative", reason=ErrorReason.INVALID_COUNT)
        fence = validate_fence(fence)
        family = family if family is not Family.UNSPECIFIED else Family.IPV4
        if prefix:
            if family is not Family.IPV4:
                raise InvalidArgument("a prefix is reserved as IPv4", reason=ErrorReason.WRONG_FAMILY)
            prefix = str(parse_prefix(prefix))
        outcome = await self.store.reserve_for_release(
            node, pool, family, interface_id, count, fence=fence, prefix=prefix
        )
        return outcome.reservation_id, outcome.ips

    async def complete_release(
        self, node: str, pool: str, reservation_id: str, ips: Sequence[str], *, fence: int = 0
    ) -> list[str]:
        node, pool = self._target(node, pool)
        validate_text(reservation_id, "reservation id", 64, required=True)
        ips, fence = self._worker_ips(ips), validate_fence(fence)
        return (await self.store.complete_release(node, pool, reservation_id, ips, fence=fence)).ips

    async def abort_release(self, node: str, pool: str, reservation_id: str, *, fence: int = 0) -> list[str]:
        node, pool = self._target(node, pool)
        validate_text(reservation_id, "reservation id", 64, required=True)
        return (await self.store.abort_release(node, pool, reservation_id, fence=validate_fence(fence))).ips

    async def remove_addresses(
        self,
        node: str,
        pool: str,
        ips: Sequence[str],
        *,
        fence: int = 0,
        prefixes: Sequence[str] = (),
        ipv6_prefix: str = "",
    ) -> RemoveOutcome:
        """Drops what the cloud no longer holds: addresses, IPv4 /28 `prefixes` and the IPv6 /80
        `ipv6_prefix` with all their addresses (those allocated are marked lost)."""
        node, pool = self._target(node, pool)
        ips, fence = self._worker_ips(ips), validate_fence(fence)
        gone = [str(parse_prefix(p)) for p in prefixes]
        if ipv6_prefix:
            gone.append(str(parse_ipv6_80(ipv6_prefix)))
        return await self.store.remove_addresses(node, pool, ips, fence=fence, prefixes=gone)


def pool_work(state: PoolState) -> tuple[int, int]:
    """(needed, excess) of a pool for the worker: per family, waiting callers counted for their own
    family; a family the node does not enable needs nothing and all its free addresses are excess
    (switching IPv6 off gives its addresses back), whether or not the node releases excess."""
    v4, v6, w = state.counts[Family.IPV4], state.counts[Family.IPV6], state.watermarks
    # At capacity nothing more can be attached: only a release helps, and it needs no worker.
    need4 = 0 if state.deficit_reason == DeficitReason.AT_CAPACITY else pool_demand_ips(v4, w, state.waiting_ipv4)
    excess4 = pool_excess_with_prefixes(v4, w, state.stranded) if state.release_excess else 0
    if state.ipv6_prefix:
        need6, excess6 = 0, 0  # a /80 never runs dry; it goes back to the cloud only whole
    elif state.ipv6_enabled:
        need6 = pool_demand_ips(v6, w, state.waiting_ipv6)
        excess6 = pool_excess_ips(v6, w) if state.release_excess else 0
    else:
        need6, excess6 = 0, max(v6.available - v6.used, 0)
    return max(need4, need6), max(excess4, excess6)


def _stats(state: PoolState, record: NodeRecord | None = None) -> NodeStats:
    """A pool's statistics; the interface figures need the node's record and are 0 without it."""
    return node_stats(
        state.counts[Family.IPV4],
        state.counts[Family.IPV6],
        state.watermarks,
        ipv6_enabled=state.ipv6_enabled,
        interfaces=record.interfaces if record else [],
        max_interfaces=record.max_interfaces if record else 0,
        ipv4_per_interface=record.ipv4_per_interface if record else 0,
        first_interface_index=record.first_interface_index if record else 0,
        waiting_ipv4=state.waiting_ipv4,
        waiting_ipv6=state.waiting_ipv6,
        lost_ips=state.lost_ips,
        reserved=state.reserved,
        excluded=state.excluded,
        prefixes=state.prefixes,
        stranded=state.stranded,
        ipv6_prefix=state.ipv6_prefix,
    )


def _check_subnets(interface: NodeInterface) -> None:
    """Each family's subnet and gateway of a reported interface is of that family (or unknown), and
    its prefixes are canonical /28s inside its IPv4 subnet."""
    check_subnet(interface.subnet_cidr, interface.gateway_ip, Family.IPV4)
    check_subnet(interface.subnet_ipv6_cidr, interface.gateway_ipv6, Family.IPV6)
    parse_prefixes(interface.ipv4_prefixes, interface.id, interface.subnet_cidr)


@dataclass(frozen=True, slots=True)
class Added:
    """What an AddAddresses brought that the pool did not hold: single addresses and prefixes."""

    ips: list[str]
    prefixes: list[str]
