"""Lets AllocateNext with `wait_for_refill` wake as soon as the worker adds addresses.

One pub/sub subscription per process fans out to local waiters; a waiter also re-checks on its
own every `wait` call, so a notification missed while reconnecting costs at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .store import keys
from .store.redis_store import RedisStore

log = logging.getLogger(__name__)


class RefillWatcher:
    """Wakes callers waiting on a (node, pool) when addresses were added to it."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    async def notify(self, node: str, pool: str) -> None:
        """Tells every allocator process that (node, pool) changed ("" pool = every pool of the node)."""
        await self._store._call(lambda: self._store.client.publish(keys.REFILL_CHANNEL, keys.timer_member(node, pool)))

    async def wait(self, node: str, pool: str, timeout: float) -> None:
        """Returns when (node, pool) was refilled or after `timeout` seconds, whichever comes first."""
        event = self._waiters.setdefault((node, pool), asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _wake(self, node: str, pool: str) -> None:
        targets = [k for k in self._waiters if k[0] == node and (not pool or k[1] == pool)]
        for key in targets:
            self._waiters.pop(key).set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._store.client.pubsub()
                await pubsub.subscribe(keys.REFILL_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        data = message["data"]
                        node, pool = keys.split_timer_member(data.decode() if isinstance(data, bytes) else data)
                        self._wake(node, pool)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: waiters fall back to their own re-checks
                log.debug("refill subscription lost: %s", exc)
                await asyncio.sleep(1.0)
