"""The allocator's service against fakes behind its seams (`PoolStore`, `EventQueue`, `Refills`):
what the service itself decides — which event goes out and when, a replay that publishes nothing,
waiting callers counted before the event, a keyless call given back — not what the Lua scripts do
(the integration tests run the service on a real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.allocator.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from services.allocator.domain.model import Allocation
from services.allocator.domain.pool import (
    AllocateOutcome,
    ChangeOutcome,
    EventKind,
    PoolEmpty,
    PoolEvent,
    PoolState,
)
from services.allocator.service import AllocatorService
from services.allocator.store.base import PoolStore
from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks
from services.core.reasons import DeficitReason, ErrorReason

NODE, POOL = "node-a", "default"


@dataclass
class FakePool:
    """One pool in memory: free addresses per family, allocations by address and by key."""

    watermarks: Watermarks = field(default_factory=Watermarks)
    release_excess: bool = False
    ipv6_enabled: bool = False
    deficit_reason: str = ""
    free: dict[Family, list[str]] = field(default_factory=lambda: {Family.IPV4: [], Family.IPV6: []})
    allocated: dict[str, tuple[str, str]] = field(default_factory=dict)  # ip -> (owner, key)
    waiting: dict[str, Family] = field(default_factory=dict)
    pending: bool = False  # the queue's coalescing marker

    def add(self, count: int, family: Family = Family.IPV4) -> None:
        start = len(self.free[family]) + sum(1 for ip in self.allocated if _family(ip) is family)
        self.free[family] += [_address(family, start + i) for i in range(count)]

    def state(self) -> PoolState:
        def counts(f: Family) -> PoolCounts:
            used = sum(1 for ip in self.allocated if _family(ip) is f)
            return PoolCounts(available=used + len(self.free[f]), used=used)

        return PoolState(
            counts={Family.IPV4: counts(Family.IPV4), Family.IPV6: counts(Family.IPV6)},
            watermarks=self.watermarks,
            release_excess=self.release_excess,
            ipv6_enabled=self.ipv6_enabled,
            event_pending=self.pending,
            waiting_ipv4=sum(1 for f in self.waiting.values() if f is Family.IPV4),
            waiting_ipv6=sum(1 for f in self.waiting.values() if f is Family.IPV6),
            deficit_reason=self.deficit_reason,
        )


def _address(family: Family, index: int) -> str:
    return f"10.0.0.{index + 10}" if family is Family.IPV4 else f"2001:db8::{index + 10:x}"


def _family(ip: str) -> Family:
    return Family.IPV6 if ":" in ip else Family.IPV4


class FakeStore:
    """The parts of `PoolStore` the service's allocation paths use, over one in-memory pool; what
    it was asked is kept in `calls`. The rest of the Protocol is not needed here."""

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail_next: Exception | None = None

    def _ask(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def _allocation(self, ip: str, owner: str) -> Allocation:
        return Allocation(ip=ip, family=_family(ip), pool=POOL, owner=owner)

    async def allocate_next(
        self, node: str, pool: str, families: Sequence[Family], owner: str, idempotency_key: str, expiration_s: int
    ) -> AllocateOutcome:
        self._ask("allocate_next", node, pool, tuple(families), owner, idempotency_key)
        p = self.pool
        held = [ip for ip, (_, key) in p.allocated.items() if key == idempotency_key]
        if held:
            return AllocateOutcome([self._allocation(ip, owner) for ip in held], p.state(), replayed=True)
        for f in families:
            if not p.free[f]:
                raise PoolEmpty("no free address", reason=ErrorReason.POOL_EMPTY, family=f, state=p.state())
        taken = [p.free[f].pop(0) for f in families]
        for ip in taken:
            p.allocated[ip] = (owner, idempotency_key)
        return AllocateOutcome([self._allocation(ip, owner) for ip in taken], p.state())

    async def release(self, node: str, pool: str, *, ip: str | None = None, owner: str | None = None) -> ChangeOutcome:
        self._ask("release", node, pool, ip, owner)
        p = self.pool
        gone = [a for a, (o, _) in p.allocated.items() if a == ip or (owner is not None and o == owner)]
        for a in gone:
            del p.allocated[a]
            p.free[_family(a)].append(a)
        return ChangeOutcome(p.state(), gone)

    async def cancel_call(self, node: str, pool: str, key: str) -> ChangeOutcome:
        self._ask("cancel_call", node, pool, key)
        p = self.pool
        gone = [ip for ip, (_, k) in p.allocated.items() if k == key]
        for ip in gone:
            del p.allocated[ip]
            p.free[_family(ip)].append(ip)
        return ChangeOutcome(p.state(), gone)

    def waiter_id(self, family: Family, call_id: str) -> str:
        return f"{family.tag}:{call_id}"

    async def add_waiter(self, node: str, pool: str, call_id: str, deadline_ms: int) -> None:
        self._ask("add_waiter", call_id)
        self.pool.waiting[call_id] = Family.IPV6 if call_id.startswith("6:") else Family.IPV4

    async def remove_waiter(self, node: str, pool: str, call_id: str) -> None:
        self._ask("remove_waiter", call_id)
        self.pool.waiting.pop(call_id, None)


@dataclass
class FakeQueue:
    """Coalesces on the pool's marker as the stream queue does; `taken()` is the worker taking them."""

    pool: FakePool
    published: list[PoolEvent] = field(default_factory=list)
    fail: Exception | None = None

    async def publish_once(self, event: PoolEvent) -> bool:
        if self.fail is not None:
            raise self.fail
        if self.pool.pending:
            return False
        self.pool.pending = True
        self.published.append(event)
        return True

    def taken(self) -> list[EventKind]:
        kinds = [e.kind for e in self.published]
        self.published.clear()
        self.pool.pending = False
        return kinds


@dataclass
class FakeRefills:
    """A refill the worker brings while a caller waits: `bring` addresses added, then the caller woken."""

    pool: FakePool
    bring: int = 0
    waits: list[float] = field(default_factory=list)
    waiting_seen: list[int] = field(default_factory=list)

    async def notify(self, node: str, pool: str, added: int = 0) -> None:
        pass

    async def wait(self, node: str, pool: str, timeout: float) -> bool:
        self.waits.append(timeout)
        self.waiting_seen.append(len(self.pool.waiting))
        if not self.bring:
            return False
        self.pool.add(self.bring)
        return True


def service(
    pool: FakePool, *, refills: FakeRefills | None = None, ipv6: bool = True
) -> tuple[AllocatorService, FakeStore, FakeQueue]:
    store, queue = FakeStore(pool), FakeQueue(pool)
    store_seam: PoolStore = store  # type: ignore[assignment]  # a partial fake: only what these paths call
    return AllocatorService(store_seam, queue, refills, ipv4_enabled=True, ipv6_enabled=ipv6), store, queue


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_an_allocation_below_the_watermark_publishes_one_deficit_event() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=2))
    pool.add(4)
    svc, _, queue = service(pool)
    for n in range(2):  # 3 and then 2 free: at the watermark, nothing to do
        run(svc.allocate_next(NODE, POOL, Family.IPV4, f"pod-{n}"))
    assert queue.published == []
    run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod-2"))  # 1 free
    run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod-3"))  # 0 free, the event still pending
    assert queue.published == [PoolEvent(NODE, POOL, EventKind.DEFICIT)]


def test_a_replayed_key_returns_the_same_address_and_publishes_nothing() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=8))
    pool.add(3)
    svc, _, queue = service(pool)
    first = run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod", idempotency_key="k1"))
    assert queue.taken() == [EventKind.DEFICIT]
    again = run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod", idempotency_key="k1"))
    assert again == first and queue.published == []
    assert len(pool.allocated) == 1


def test_skip_sync_upstream_publishes_nothing() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=8))
    pool.add(1)
    svc, _, queue = service(pool)
    run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod", skip_sync_upstream=True))
    assert queue.published == [] and len(pool.allocated) == 1


def test_a_node_at_capacity_publishes_no_deficit() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=8), deficit_reason=DeficitReason.AT_CAPACITY)
    pool.add(2)
    svc, _, queue = service(pool)
    run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod"))
    assert queue.published == []


def test_an_empty_pool_publishes_a_deficit_and_answers_pool_empty() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=1))
    svc, _, queue = service(pool)
    with pytest.raises(PoolEmpty) as caught:
        run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod"))
    assert caught.value.reason == ErrorReason.POOL_EMPTY
    assert queue.published == [PoolEvent(NODE, POOL, EventKind.DEFICIT)]


def test_a_waiting_caller_is_counted_before_the_event_and_served_by_the_refill() -> None:
    # pre_allocate 0: only the waiting caller makes the pool need an address.
    pool = FakePool(watermarks=Watermarks(pre_allocate=0))
    refills = FakeRefills(pool, bring=1)
    svc, store, queue = service(pool, refills=refills)
    got = run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod", wait_for_refill=True, deadline=None))
    assert [a.ip for a in got] == ["10.0.0.10"]
    assert queue.published == [PoolEvent(NODE, POOL, EventKind.DEFICIT)]
    assert refills.waiting_seen == [1]  # counted while it waited ...
    assert pool.waiting == {}  # ... and no longer once served
    waiter = next(args[0] for name, args in store.calls if name == "add_waiter")
    assert waiter.startswith("4:") and ("remove_waiter", (waiter,)) in store.calls


def test_an_ipv6_waiter_is_counted_for_ipv6() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=0), ipv6_enabled=True)
    refills = FakeRefills(pool, bring=0)  # no refill comes within the deadline
    svc, store, queue = service(pool, refills=refills)
    with pytest.raises(PoolEmpty):
        deadline = time.monotonic() + 1.0
        run(svc.allocate_next(NODE, POOL, Family.IPV6, "pod", wait_for_refill=True, deadline=deadline))
    assert queue.published == [PoolEvent(NODE, POOL, EventKind.DEFICIT)]
    assert [args[0][:2] for name, args in store.calls if name == "add_waiter"] == ["6:"]
    assert len(refills.waits) == 1 and refills.waits[0] < 1.0  # it stops waiting before its deadline


def test_a_release_above_the_watermark_publishes_excess_only_where_the_node_releases_excess() -> None:
    for release_excess, expected in ((True, [EventKind.EXCESS]), (False, [])):
        pool = FakePool(watermarks=Watermarks(pre_allocate=1), release_excess=release_excess)
        pool.add(3)
        svc, _, queue = service(pool)
        run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod", skip_sync_upstream=True))
        released = run(svc.release(NODE, POOL, owner="pod"))
        assert released == ["10.0.0.10"] and queue.taken() == expected


def test_a_release_without_ip_or_owner_is_refused_and_changes_nothing() -> None:
    pool = FakePool()
    svc, store, queue = service(pool)
    with pytest.raises(InvalidArgument) as caught:
        run(svc.release(NODE, POOL))
    assert caught.value.reason == ErrorReason.IP_OR_OWNER_REQUIRED
    assert store.calls == [] and queue.published == []


def test_a_disabled_family_is_refused_before_the_store() -> None:
    pool = FakePool()
    pool.add(1, Family.IPV6)
    svc, store, _ = service(pool, ipv6=False)
    with pytest.raises(FailedPrecondition) as caught:
        run(svc.allocate_next(NODE, POOL, Family.IPV6, "pod"))
    assert caught.value.reason == ErrorReason.IPV6_DISABLED and store.calls == []


def test_a_lost_event_does_not_fail_the_allocation() -> None:
    pool = FakePool(watermarks=Watermarks(pre_allocate=8))
    pool.add(1)
    svc, _, queue = service(pool)
    queue.fail = Unavailable("redis is unreachable")
    got = run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod"))
    assert [a.ip for a in got] == ["10.0.0.10"] and pool.allocated


def test_a_keyless_call_without_answer_is_given_back_under_its_own_key() -> None:
    pool = FakePool()
    pool.add(1)
    svc, store, _ = service(pool)

    async def scenario() -> None:
        store.fail_next = OutcomeUnknown("no answer", waited="0.5 s")
        with pytest.raises(OutcomeUnknown) as caught:
            await svc.allocate_next(NODE, POOL, Family.IPV4, "pod")
        assert "gives back whatever it took" in caught.value.message
        await asyncio.gather(*svc._rollbacks)

    run(scenario())
    names = [name for name, _ in store.calls]
    assert names == ["allocate_next", "cancel_call"]
    key_sent = store.calls[0][1][4]
    assert key_sent and store.calls[1][1][2] == key_sent  # the same key the lost call carried


def test_a_given_back_call_stops_when_the_node_is_gone() -> None:
    pool = FakePool()
    svc, store, _ = service(pool)
    store.fail_next = NotFound("node node-a is not known", reason=ErrorReason.NODE_NOT_FOUND)
    run(svc._cancel_call(NODE, POOL, "k"))
    assert [name for name, _ in store.calls] == ["cancel_call"]


class SlowAfterTheWait(FakeRefills):
    """No refill comes, and when the caller asks again Redis cannot answer within its deadline."""

    def __init__(self, pool: FakePool, store: FakeStore, error: Exception) -> None:
        super().__init__(pool)
        self.store, self.error = store, error

    async def wait(self, node: str, pool: str, timeout: float) -> bool:
        self.store.fail_next = self.error
        return await super().wait(node, pool, 0)


def _asking_again_fails(error: Exception) -> Exception:
    pool = FakePool(watermarks=Watermarks(pre_allocate=0))
    svc, store, _ = service(pool)
    svc.refills = SlowAfterTheWait(pool, store, error)
    deadline = time.monotonic() + 30  # long enough that the wait ends at its 5 s bound and asks again
    with pytest.raises(Exception) as caught:
        run(svc.allocate_next(NODE, POOL, Family.IPV4, "pod", wait_for_refill=True, deadline=deadline))
    assert [name for name, _ in store.calls].count("allocate_next") == 2
    return caught.value


def test_a_waiting_call_whose_deadline_leaves_redis_no_time_gets_the_pools_answer() -> None:
    unanswered = Unavailable("redis did not answer within the call's deadline")
    unanswered.final = True
    assert isinstance(_asking_again_fails(unanswered), PoolEmpty)


def test_a_waiting_call_with_time_left_says_redis_is_unavailable() -> None:
    error = _asking_again_fails(Unavailable("redis is unreachable"))  # a retry could do better: said so
    assert isinstance(error, Unavailable)
