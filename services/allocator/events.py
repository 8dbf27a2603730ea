"""The queue the allocator publishes pool events to, behind a small interface.

Coalescing: at most one pending event per (node, pool). A marker key with a time-to-live is set
with NX before the event is added; the worker deletes the marker when it takes the event, so a
new change after that publishes again. A publish lost in a crash expires with its marker and is
repaired by the worker's periodic resync.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import ResponseError

from ipam.v1 import events_pb2
from services.core import contract, liveness
from services.core.redis_client import RedisClient

from .domain.pool import EventKind, PoolEvent
from .store.redis_store import RedisStore


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the worker gave up on: its dead-letter id, its id in the events stream, its tries."""

    id: str
    entry_id: str
    deliveries: int
    event: PoolEvent


@dataclass(frozen=True, slots=True)
class Consumer:
    """A worker: its name, events it holds unacknowledged, ms since it last read the stream (as Redis
    counts it: an empty blocking read does not reset it on Redis 7.0), whether its heartbeat is live
    and the ms until that heartbeat expires."""

    name: str
    pending: int
    idle_ms: int
    alive: bool = False
    heartbeat_ms: int = 0


class EventQueue(Protocol):
    """Where pool events go, and what operators see of them."""

    async def publish_once(self, event: PoolEvent) -> bool:
        """Publishes unless an event for the same (node, pool) is still pending; True if published."""
        ...

    async def counts(self) -> tuple[int, int]:
        """(events not yet handled, dead letters kept)."""
        ...

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The newest `limit` dead letters, newest first."""
        ...

    async def consumers(self) -> list[Consumer]:
        """The workers: the stream's consumers in every group and those with a live heartbeat."""
        ...

    async def replay(self, ids: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """Puts these dead letters (every one when None) back on the stream: (replayed, not found)."""
        ...


class RedisStreamQueue:
    """Pool events on a Redis Stream (`ipam:events`), one field `event` holding a `PoolEvent`."""

    def __init__(
        self,
        store: RedisStore,
        *,
        coalesce_seconds: int,
        stream: str = contract.EVENTS_STREAM,
        dead_stream: str = contract.DEAD_LETTER_STREAM,
    ) -> None:
        self._store = store
        self._client: RedisClient = store.client
        self._coalesce_seconds = coalesce_seconds
        self.stream = stream
        self.dead_stream = dead_stream

    async def publish_once(self, event: PoolEvent) -> bool:
        marker = contract.pending_event_key(event.node, event.pool)
        fresh = await self._store.call(lambda: self._client.set(marker, b"1", nx=True, ex=self._coalesce_seconds))
        if not fresh:
            return False
        message = events_pb2.PoolEvent(
            node=event.node, pool=event.pool, kind=int(event.kind), published_at_ms=int(time.time() * 1000)
        )
        fields = {b"node": event.node.encode(), b"pool": event.pool.encode(), b"event": message.SerializeToString()}
        await self._store.call(lambda: self._client.xadd(self.stream, fields))
        return True

    async def counts(self) -> tuple[int, int]:
        async def read() -> tuple[int, int]:
            pending = 0
            try:
                for group in await self._client.xinfo_groups(self.stream):
                    # pending: delivered, not acknowledged; lag: not delivered yet (Redis 7).
                    pending += int(group.get("pending") or 0) + int(group.get("lag") or 0)
            except ResponseError:  # no stream yet
                pending = 0
            return pending, int(await self._client.xlen(self.dead_stream))

        return await self._store.call(read)

    async def consumers(self) -> list[Consumer]:
        async def read() -> list[Consumer]:
            alive = await liveness.alive(self._client)
            try:
                groups = await self._client.xinfo_groups(self.stream)
            except ResponseError:  # no stream yet
                groups = []
            found = []
            for group in groups:
                for c in await self._client.xinfo_consumers(self.stream, _text(group["name"])):
                    name = _text(c["name"])
                    found.append(
                        Consumer(
                            name,
                            int(c.get("pending") or 0),
                            int(c.get("idle") or 0),
                            alive=name in alive,
                            heartbeat_ms=alive.get(name, 0),
                        )
                    )
            # A live worker not in a group (not read yet, or removed by a worker of an older release).
            named = {c.name for c in found}
            found += [Consumer(n, 0, 0, alive=True, heartbeat_ms=ms) for n, ms in alive.items() if n not in named]
            return found

        return await self._store.call(read)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        entries = await self._store.call(lambda: self._client.xrevrange(self.dead_stream, count=limit))
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    async def replay(self, ids: Sequence[str] | None) -> tuple[list[str], list[str]]:
        if ids is None:
            found = await self._store.call(lambda: self._client.xrange(self.dead_stream))
            missing: list[str] = []
        else:
            found, missing = [], []
            for dead_id in ids:
                entries = await self._store.call(
                    lambda dead_id=dead_id: self._client.xrange(self.dead_stream, min=dead_id, max=dead_id)
                )
                if entries:
                    found.extend(entries)
                else:
                    missing.append(dead_id)
        replayed = []
        for entry_id, fields in found:
            event = events_pb2.PoolEvent.FromString(fields[b"event"])
            event.published_at_ms = int(time.time() * 1000)
            again = {b"node": fields[b"node"], b"pool": fields[b"pool"], b"event": event.SerializeToString()}
            await self._store.call(lambda again=again: self._client.xadd(self.stream, again))
            await self._store.call(lambda entry_id=entry_id: self._client.xdel(self.dead_stream, entry_id))
            replayed.append(_text(entry_id))
        return replayed, missing


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event(raw: bytes) -> PoolEvent:
    message = events_pb2.PoolEvent.FromString(raw)
    kind = message.kind if message.kind in EventKind._value2member_map_ else EventKind.UNSPECIFIED
    return PoolEvent(message.node, message.pool, EventKind(kind), message.published_at_ms)


def _dead_letter(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        id=_text(entry_id),
        entry_id=_text(fields.get(b"entry_id", b"")),
        deliveries=int(fields.get(b"deliveries", b"0") or 0),
        event=_event(fields.get(b"event", b"")),
    )
