"""Worker liveness: a heartbeat per worker with a time-to-live, renewed well within it.

Each worker's heartbeat is its name in one sorted set, scored by the time (Redis's clock, so the
hosts' clocks do not matter) at which it expires; a worker is alive while that time is ahead. One
key, so the allocator lists every worker with one read, on Redis Cluster too. The consumer group
cannot tell this: on Redis 7.0 an empty blocking XREADGROUP does not reset a consumer's idle time,
so an idle worker looks as dead as a killed one.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from . import contract


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


_BEAT = _script("heartbeat")
_ALIVE = _script("alive_workers")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def beat(client: Any, name: str, ttl_seconds: float, *, key: str = contract.WORKER_HEARTBEATS) -> None:
    """Renews `name`'s heartbeat for `ttl_seconds` from now."""
    await client.eval(_BEAT, 1, key, name, max(int(ttl_seconds * 1000), 1))


async def leave(client: Any, name: str, *, key: str = contract.WORKER_HEARTBEATS) -> None:
    """Drops `name`'s heartbeat at once (a worker stopping cleanly)."""
    await client.zrem(key, name)


async def alive(client: Any, *, key: str = contract.WORKER_HEARTBEATS) -> dict[str, int]:
    """The workers whose heartbeat has not expired: name -> ms until it does."""
    reply = await client.eval(_ALIVE, 1, key)
    return {_text(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)}
