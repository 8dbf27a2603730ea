"""The events queue, consumer side: a consumer group on the allocator's Redis Stream.

XREADGROUP hands each event to one worker; it is acknowledged (XACK) only after the node was
maintained, so a worker that dies leaves it pending and another claims it (XAUTOCLAIM) once idle.
An event delivered `max_deliveries` times goes to a dead-letter stream instead of looping forever.
A consumer left with nothing pending, idle past the claim time and without a live heartbeat (a
dead worker, its entries claimed) is removed from the group, so that dead workers do not pile up in
it. The heartbeat decides, not the idle time: on Redis 7.0 an empty blocking read does not reset it,
so a live worker of an idle cluster looks idle forever.
Trimming removes only entries every consumer has acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from ipam.v1 import events_pb2
from services.core import contract, liveness

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event handed to this worker."""

    entry_id: str
    event: events_pb2.PoolEvent
    deliveries: int = 1


class EventSource(Protocol):
    """Where the worker's events come from (a second queue is one new class of this shape)."""

    async def start(self) -> None: ...
    async def fetch(self, count: int, block_ms: int) -> list[Delivery]: ...
    async def take(self, delivery: Delivery) -> None: ...
    async def ack(self, delivery: Delivery) -> None: ...
    async def trim(self) -> int: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# DELCONSUMER drops a consumer's pending entries with it: delete it only while it has none, atomically
# (a worker that is alive after all may read an entry between a check and the delete).
_DELETE_IF_EMPTY = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class RedisStreamSource:
    """A consumer of `ipam:events` in a consumer group."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        group: str,
        consumer: str,
        max_deliveries: int,
        claim_idle_ms: int,
        stream: str = contract.EVENTS_STREAM,
        on_dead_letter: Callable[[Delivery], None] | None = None,
    ) -> None:
        self.client = client
        self.on_dead_letter = on_dead_letter  # e.g. a counter
        self.group = group
        self.consumer = consumer
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.stream = stream
        self._backlog = True  # first read our own pending entries (a restart after a crash)
        self._pruned_at = 0.0  # monotonic time of the last look for dead consumers

    async def start(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def fetch(self, count: int, block_ms: int) -> list[Delivery]:
        """Own pending entries first, then entries idle at dead consumers, then new ones."""
        try:
            return await self._fetch(count, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the stream or the group (restarted without its data, FLUSHALL): make the
            # group again, from the start of whatever the stream holds now.
            log.warning("the consumer group %s of %s is gone: creating it again", self.group, self.stream)
            await self.start()
            return []

    async def _fetch(self, count: int, block_ms: int) -> list[Delivery]:
        if self._backlog:
            entries = await self._read("0", count, None)
            if entries:
                return await self._deliveries(entries, redelivered=True)
            self._backlog = False
        claimed = await self.client.xautoclaim(
            self.stream, self.group, self.consumer, self.claim_idle_ms, start_id="0-0", count=count
        )
        if claimed and claimed[1]:
            return await self._deliveries(claimed[1], redelivered=True)
        if time.monotonic() - self._pruned_at >= self.claim_idle_ms / 1000:
            self._pruned_at = time.monotonic()
            await self.prune_consumers()
        return await self._deliveries(await self._read(">", count, block_ms), redelivered=False)

    async def prune_consumers(self) -> list[str]:
        """Removes the consumers with nothing pending, idle past the claim time and without a live
        heartbeat; returns their names. Whatever a dead worker held has been claimed by then
        (XAUTOCLAIM above). A worker of a release without heartbeats, idle that long, is removed
        too, and made again by its next read."""
        removed = []
        consumers = await self.client.xinfo_consumers(self.stream, self.group)
        alive = await liveness.alive(self.client) if consumers else {}
        for consumer in consumers:
            name = _text(consumer["name"])
            if name == self.consumer or name in alive:
                continue
            if int(consumer["pending"]) or int(consumer["idle"]) < self.claim_idle_ms:
                continue
            if await self.client.eval(_DELETE_IF_EMPTY, 1, self.stream, self.group, name):
                removed.append(name)
        if removed:
            log.info("removed %d idle consumers without pending events from %s: %s", len(removed), self.group, removed)
        return removed

    async def _read(self, start: str, count: int, block_ms: int | None) -> list[Any]:
        reply = await self.client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count, block=block_ms
        )
        # [[stream, [(id, fields), ...]]]; one stream here.
        return list(reply[0][1]) if reply else []

    async def _deliveries(self, entries: list[Any], *, redelivered: bool) -> list[Delivery]:
        out: list[Delivery] = []
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile: nothing to do but acknowledge
                await self.client.xack(self.stream, self.group, entry_id)
                continue
            deliveries = await self._delivery_count(entry_id) if redelivered else 1
            event = events_pb2.PoolEvent.FromString(fields[b"event"])
            delivery = Delivery(_text(entry_id), event, deliveries)
            if deliveries > self.max_deliveries:
                await self.dead_letter(delivery, fields)
                continue
            out.append(delivery)
        return out

    async def _delivery_count(self, entry_id: Any) -> int:
        pending = await self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 1

    async def dead_letter(self, delivery: Delivery, fields: dict[bytes, bytes]) -> None:
        log.error(
            "event %s for node %s failed %d times: moved to %s",
            delivery.entry_id,
            delivery.event.node,
            delivery.deliveries - 1,
            contract.DEAD_LETTER_STREAM,
        )
        await self.client.xadd(
            contract.DEAD_LETTER_STREAM,
            {**fields, b"entry_id": delivery.entry_id.encode(), b"deliveries": str(delivery.deliveries - 1).encode()},
            maxlen=10_000,
            approximate=True,
        )
        await self.client.xack(self.stream, self.group, delivery.entry_id)
        if self.on_dead_letter is not None:
            self.on_dead_letter(delivery)

    async def ack(self, delivery: Delivery) -> None:
        await self.client.xack(self.stream, self.group, delivery.entry_id)

    async def take(self, delivery: Delivery) -> None:
        """Clears the allocator's coalescing marker: a change from now on publishes a new event."""
        await self.client.delete(contract.pending_event_key(delivery.event.node, delivery.event.pool))

    async def trim(self) -> int:
        """Drops entries older than both the oldest pending one and the group's last delivered one."""
        groups = await self.client.xinfo_groups(self.stream)
        floor: str | None = None
        for group in groups:
            last = _text(group.get("last-delivered-id", "0-0"))
            floor = last if floor is None or _stream_id(last) < _stream_id(floor) else floor
            summary = await self.client.xpending(self.stream, _text(group["name"]))
            if summary and summary.get("pending"):
                oldest = _text(summary["min"])
                floor = oldest if _stream_id(oldest) < _stream_id(floor) else floor
        if floor is None or floor == "0-0":
            return 0
        return int(await self.client.xtrim(self.stream, minid=floor, approximate=False))


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)
