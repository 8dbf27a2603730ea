"""The queue the allocator publishes pool events to, behind a small interface.

Coalescing: at most one pending event per (node, pool). A marker key with a time-to-live is set
with NX before the event is added; the worker deletes the marker when it takes the event, so a
new change after that publishes again. A publish lost in a crash expires with its marker and is
repaired by the worker's periodic resync.
"""

from __future__ import annotations

import time
from typing import Protocol

from ipam.v1 import events_pb2

from .store import keys
from .store.redis_store import RedisClient, RedisStore


class EventQueue(Protocol):
    """Where pool events go."""

    async def publish_once(self, event: events_pb2.PoolEvent) -> bool:
        """Publishes unless an event for the same (node, pool) is still pending; True if published."""
        ...


class RedisStreamQueue:
    """Pool events on a Redis Stream (`ipam:events`), one field `event` holding a `PoolEvent`."""

    def __init__(self, store: RedisStore, *, coalesce_seconds: int, stream: str = keys.EVENTS_STREAM) -> None:
        self._store = store
        self._client: RedisClient = store.client
        self._coalesce_seconds = coalesce_seconds
        self.stream = stream

    async def publish_once(self, event: events_pb2.PoolEvent) -> bool:
        marker = keys.pending_event_key(event.node, event.pool)
        fresh = await self._store.call(lambda: self._client.set(marker, b"1", nx=True, ex=self._coalesce_seconds))
        if not fresh:
            return False
        event.published_at_ms = int(time.time() * 1000)
        fields = {b"node": event.node.encode(), b"pool": event.pool.encode(), b"event": event.SerializeToString()}
        await self._store.call(lambda: self._client.xadd(self.stream, fields))
        return True
