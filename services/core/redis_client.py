"""The Redis connection factory both services use: one Redis, the master Sentinel names, or a Cluster."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.sentinel
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

RedisClient = aioredis.Redis | RedisCluster


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port` -> [(host, port), ...]; ValueError naming the entry that is not one."""
    sentinels = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    return sentinels


def check_sentinel_settings(sentinels: str, master: str, cluster: bool) -> None:
    """The settings' rule for IPAM_REDIS_SENTINELS / IPAM_REDIS_SENTINEL_MASTER (ValueError if broken)."""
    if not parse_sentinels(sentinels):
        return
    if not master:
        raise ValueError(
            "IPAM_REDIS_SENTINEL_MASTER (the master's name at the Sentinels) is required with IPAM_REDIS_SENTINELS"
        )
    if cluster:
        raise ValueError("IPAM_REDIS_SENTINELS and IPAM_REDIS_CLUSTER exclude each other")


def _url_options(url: str) -> dict[str, Any]:
    # With Sentinel the URL gives the database and credentials; the Sentinels give host and port.
    return {k: v for k, v in parse_url(url).items() if k in ("db", "username", "password")}


def connect(
    url: str,
    *,
    cluster: bool,
    timeout_s: float,
    max_connections: int,
    sentinels: str = "",
    sentinel_master: str = "",
) -> RedisClient:
    """A client for one Redis, a Redis Cluster, or the master that the Sentinels `sentinels`
    (`host:port,...`) name `sentinel_master` (asked again after every lost connection, so it follows
    a failover); timeouts bound every call (no hangs)."""
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
    if addresses := parse_sentinels(sentinels):
        timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        sentinel = Sentinel(addresses, sentinel_kwargs=timeouts)
        return sentinel.master_for(sentinel_master, max_connections=max_connections, **options, **_url_options(url))
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **options)
    return aioredis.Redis(connection_pool=pool)


def master_resolver(client: RedisClient) -> Callable[[], Awaitable[tuple[str, int]]] | None:
    """For a client through Sentinel, how to ask the Sentinels for the master's address now."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        return pool.get_master_address  # type: ignore[no-any-return]
    return None


def connect_sync(
    url: str, *, cluster: bool, timeout_s: float, sentinels: str = "", sentinel_master: str = ""
) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking client, as `connect` chooses (for code that runs in threads)."""
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    if addresses := parse_sentinels(sentinels):
        sentinel = redis.sentinel.Sentinel(addresses, sentinel_kwargs=options)
        return sentinel.master_for(sentinel_master, **options, **_url_options(url))
    return redis.Redis.from_url(url, **options)
