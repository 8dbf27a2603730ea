"""The refill subscription against a real Redis: it ends whenever it is told to, however early."""

from __future__ import annotations

import asyncio

import pytest

from services.allocator.refill import RefillWatcher
from services.allocator.store.redis_store import RedisStore
from services.core import redis_client
from tests.support.redis_server import RedisServer


async def _start_then_stop(redis_url: str, delay_s: float) -> tuple[bool, list[asyncio.Task[object]]]:
    """Starts a watcher and stops it `delay_s` later: whether the stop returned within 5 s, and the
    tasks still alive afterwards."""
    store = RedisStore(
        redis_client.connect(redis_url, cluster=False, timeout_s=2, max_connections=8), reuse_cooldown_ms=0
    )
    watcher = RefillWatcher(store)
    watcher.start()
    await asyncio.sleep(delay_s)
    stopping = asyncio.ensure_future(watcher.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)  # not wait_for: its own cancel would help the stop
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and t is not stopping]
    for task in [stopping, *left]:  # clean up after a failure
        task.cancel()
    await store.close()
    return bool(done), left


# redis-py swallows a cancellation that lands while the subscription connects (about 1-2 ms after
# the start here): a shutdown right after start-up used to wait for the subscription forever.
@pytest.mark.parametrize("delay_ms", [0, 0.5, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 5, 50])
def test_the_subscription_ends_when_stopped_even_right_after_the_start(
    redis_server: RedisServer, delay_ms: float
) -> None:
    stopped, left = asyncio.run(_start_then_stop(redis_server.url, delay_ms / 1000))
    assert stopped and left == []
