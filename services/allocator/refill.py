"""Lets AllocateNext with `wait_for_refill` wake as soon as the worker adds addresses.

One pub/sub subscription per process fans out to local waiters, oldest first and only as many as
addresses arrived (a refill of 6 wakes 6 callers, not 40 that would mostly find the pool empty
again). A waiter also re-checks on its own after its `wait` timeout, so a notification missed while
reconnecting costs at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from services.core.tasks import cancel_until_done

from .store import keys
from .store.redis_store import RedisStore

log = logging.getLogger(__name__)


class Refills(Protocol):
    """How callers waiting for a refill are woken: what the service asks of `RefillWatcher`."""

    async def notify(self, node: str, pool: str, added: int = 0) -> None: ...

    async def wait(self, node: str, pool: str, timeout: float) -> bool: ...


class RefillWatcher:
    """Wakes callers waiting on a (node, pool) when addresses were added to it."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def notify(self, node: str, pool: str, added: int = 0) -> None:
        """Tells every allocator process that `added` addresses arrived in (node, pool); 0 wakes every
        waiter ("" pool = every pool of the node: its deficit reason changed)."""
        message = f"{keys.node_pool(node, pool)}\x00{added}"
        await self._store.call(lambda: self._store.client.publish(keys.REFILL_CHANNEL, message))

    async def wait(self, node: str, pool: str, timeout: float) -> bool:
        """Returns True when (node, pool) was refilled for this caller, False after `timeout` seconds."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault((node, pool), [])
        queue.append(future)
        try:
            try:
                await asyncio.wait_for(future, timeout)
            except TimeoutError:
                return False
            return True
        finally:
            if future in queue:
                queue.remove(future)
            if not queue:
                self._waiters.pop((node, pool), None)

    def _wake(self, node: str, pool: str, added: int) -> None:
        for key in [k for k in self._waiters if k[0] == node and (not pool or k[1] == pool)]:
            queue = self._waiters[key]
            woken = queue if added <= 0 else queue[:added]
            for future in woken:
                if not future.done():
                    future.set_result(None)

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._listen())

    async def stop(self, timeout: float = 5.0) -> None:
        """Ends the subscription (within `timeout` seconds)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and await cancel_until_done([task], timeout):
            log.warning("the refill subscription did not stop within %g s", timeout)

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self._store.client.pubsub()
            try:
                await pubsub.subscribe(keys.REFILL_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else data
                        member, _, added = text.rpartition("\x00")
                        node, pool = keys.split_node_pool(member)
                        self._wake(node, pool, int(added or 0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: waiters fall back to their own re-checks
                log.debug("refill subscription lost: %s", exc)
                if not self._stopping:
                    await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
