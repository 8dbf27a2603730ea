"""The events queue against a real Redis: redelivery, claims, dead letters, trimming."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from ipam.v1 import events_pb2
from services.cloudworker.queue import RedisStreamSource
from services.core import liveness
from services.core.contract import DEAD_LETTER_STREAM
from tests.support.redis_server import RedisServer


@pytest.fixture
def stream(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"test-events-{request.node.name}"
    yield name


def _source(client: aioredis.Redis, stream: str, consumer: str, **options: int) -> RedisStreamSource:
    return RedisStreamSource(
        client,
        group="workers",
        consumer=consumer,
        stream=stream,
        max_deliveries=options.get("max_deliveries", 3),
        claim_idle_ms=options.get("claim_idle_ms", 50),
    )


async def _publish(client: aioredis.Redis, stream: str, node: str) -> None:
    event = events_pb2.PoolEvent(node=node, pool="default", kind=events_pb2.PoolEvent.KIND_DEFICIT)
    await client.xadd(stream, {b"node": node.encode(), b"pool": b"default", b"event": event.SerializeToString()})


def test_an_unacknowledged_event_is_claimed_by_another_consumer(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        dead, alive = _source(client, stream, "dead"), _source(client, stream, "alive")
        await dead.start()
        await _publish(client, stream, "n1")
        taken = await dead.fetch(10, block_ms=100)
        assert [d.event.node for d in taken] == ["n1"]
        # "dead" never acknowledges; once idle past the claim time, "alive" gets it (second delivery).
        claimed: list = []
        for _ in range(100):
            claimed = await alive.fetch(10, block_ms=20)
            if claimed:
                break
        assert [(d.event.node, d.deliveries) for d in claimed] == [("n1", 2)]
        await alive.ack(claimed[0])
        assert (await client.xpending(stream, "workers"))["pending"] == 0
        await client.aclose()

    asyncio.run(run())


def test_own_pending_events_come_back_after_a_restart(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        before = _source(client, stream, "w1", claim_idle_ms=60_000)
        await before.start()
        await _publish(client, stream, "n2")
        assert len(await before.fetch(10, block_ms=100)) == 1
        after = _source(client, stream, "w1", claim_idle_ms=60_000)  # the same consumer, restarted
        again = await after.fetch(10, block_ms=100)
        assert [d.event.node for d in again] == ["n2"]
        await client.aclose()

    asyncio.run(run())


def test_an_event_failing_too_often_goes_to_the_dead_letters(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        source = _source(client, stream, "w", max_deliveries=2, claim_idle_ms=0)
        await source.start()
        await _publish(client, stream, "poison")
        dead_before = await client.xlen(DEAD_LETTER_STREAM)
        seen = 0
        for _ in range(6):  # never acknowledged: delivered, claimed again, then dead-lettered
            seen += len(await source.fetch(10, block_ms=20))
        assert seen == 2
        assert await client.xlen(DEAD_LETTER_STREAM) == dead_before + 1
        assert (await client.xpending(stream, "workers"))["pending"] == 0
        await client.aclose()

    asyncio.run(run())


def test_trimming_keeps_every_unacknowledged_event(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        source = _source(client, stream, "w", claim_idle_ms=60_000)
        await source.start()
        for i in range(5):
            await _publish(client, stream, f"n{i}")
        taken = await source.fetch(10, block_ms=100)
        for delivery in taken[:2]:
            await source.ack(delivery)  # n0, n1 done; n2..n4 pending
        await _publish(client, stream, "n5")  # not yet delivered
        await source.trim()
        left = [fields[b"node"].decode() for _, fields in await client.xrange(stream)]
        assert left == ["n2", "n3", "n4", "n5"]
        await client.aclose()

    asyncio.run(run())


def test_a_dead_consumer_is_removed_once_its_events_are_claimed(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        dead, alive = _source(client, stream, "dead"), _source(client, stream, "alive")
        await dead.start()
        await _publish(client, stream, "n1")
        assert [d.event.node for d in await dead.fetch(10, block_ms=100)] == ["n1"]
        claimed: list = []
        for _ in range(100):  # each fetch claims what is idle, then looks for dead consumers
            claimed += await alive.fetch(10, block_ms=20)
            if claimed and {c["name"] for c in await client.xinfo_consumers(stream, "workers")} == {b"alive"}:
                break
        # "dead" held its entry until "alive" claimed it, and is gone from the group afterwards.
        assert [d.event.node for d in claimed] == ["n1"]
        assert {c["name"] for c in await client.xinfo_consumers(stream, "workers")} == {b"alive"}
        assert (await client.xpending(stream, "workers"))["pending"] == 1  # the claimed entry, now alive's
        await client.aclose()

    asyncio.run(run())


def test_a_consumer_with_pending_events_is_kept(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        busy, other = _source(client, stream, "busy", claim_idle_ms=60_000), _source(client, stream, "other")
        await busy.start()
        await _publish(client, stream, "n1")
        assert len(await busy.fetch(10, block_ms=100)) == 1
        await asyncio.sleep(0.1)  # idle past other's claim time (50 ms), but it still holds its entry
        assert await other.prune_consumers() == []
        assert b"busy" in {c["name"] for c in await client.xinfo_consumers(stream, "workers")}
        await client.aclose()

    asyncio.run(run())


def test_an_idle_consumer_is_kept_while_its_heartbeat_lives(redis_server: RedisServer, stream: str) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        name = f"idle-{stream}"
        idle, other = _source(client, stream, name), _source(client, stream, "other")
        await idle.start()
        assert await idle.fetch(10, block_ms=10) == []  # in the group, nothing read
        await liveness.beat(client, name, ttl_seconds=60)
        await asyncio.sleep(0.1)  # the scenario: idle past other's claim time (50 ms), nothing pending
        assert await other.prune_consumers() == []
        assert name.encode() in {c["name"] for c in await client.xinfo_consumers(stream, "workers")}
        await liveness.leave(client, name)  # no heartbeat: now it is taken as gone
        assert await other.prune_consumers() == [name]
        await client.aclose()

    asyncio.run(run())
