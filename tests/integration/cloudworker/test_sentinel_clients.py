"""The worker's Redis clients, built from its settings, find the master through Sentinel and follow
a failover (real primary, replica and Sentinels; `kill -9` of the primary)."""

from __future__ import annotations

import asyncio

import redis

from services.cloudworker.settings import WorkerSettings
from services.core import redis_client
from tests.support.polling import poll
from tests.support.redis_server import SentinelGroup


def test_the_worker_s_clients_follow_a_sentinel_failover() -> None:
    with SentinelGroup(down_after_ms=500) as group:
        # The URL names no server of the group: only its database counts.
        settings = WorkerSettings(
            redis_url="redis://127.0.0.1:1/0",
            redis_sentinels=group.sentinel_addresses,
            redis_sentinel_master=group.name,
        )
        sync = redis_client.connect_sync(
            settings.redis_url,
            cluster=False,
            timeout_s=1.0,
            sentinels=settings.redis_sentinels,
            sentinel_master=settings.redis_sentinel_master,
        )

        async def write(value: str) -> bool:
            client = redis_client.connect(
                settings.redis_url,
                cluster=False,
                timeout_s=1.0,
                max_connections=4,
                sentinels=settings.redis_sentinels,
                sentinel_master=settings.redis_sentinel_master,
            )
            try:
                return bool(await client.set("async", value))
            except redis.RedisError:
                return False
            finally:
                await client.aclose()

        def sync_write(value: str) -> bool:
            try:
                return bool(sync.set("sync", value))
            except redis.RedisError:
                return False

        assert asyncio.run(write("before")) and sync_write("before")
        group.primary.kill()
        group.wait_promoted(group.replica)
        poll(lambda: asyncio.run(write("after")), timeout=10)
        poll(lambda: sync_write("after"), timeout=10)
        with group.replica.client() as promoted:
            assert (promoted.get("async"), promoted.get("sync")) == ("after", "after")
        sync.close()
