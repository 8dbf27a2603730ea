"""The Redis connection factory both services use."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

RedisClient = aioredis.Redis | RedisCluster


def connect(url: str, *, cluster: bool, timeout_s: float, max_connections: int) -> RedisClient:
    """A client for one Redis or a Redis Cluster; timeouts bound every call (no hangs)."""
    # A connection found broken (Redis restarted) is retried once on a fresh one. Timeouts are
    # not retried: the command may still run. A script cut off after it ran is the one case a
    # retry repeats; callers that need exactly-once use an idempotency key.
    options: dict[str, Any] = dict(
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=False,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections, **options)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **options)
    return aioredis.Redis(connection_pool=pool)
