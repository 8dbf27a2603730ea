"""The shared, auto-pipelined Redis connection of the pool scripts, against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.allocator.store.pipelining import NotReplicatedError, OutcomeUnknownError, PipelinedConnection
from tests.support.redis_server import RedisServer, SentinelGroup

T = TypeVar("T")


def run(test: Callable[[PipelinedConnection], Awaitable[T]], url: str, timeout_s: float = 2.0) -> T:
    async def main() -> T:
        connection = PipelinedConnection.from_url(url, timeout_s=timeout_s)
        assert connection is not None
        try:
            return await test(connection)
        finally:
            await connection.close()

    return asyncio.run(main())


def test_concurrent_callers_share_one_connection_and_each_gets_its_own_reply(redis_server: RedisServer) -> None:
    observer = redis_server.client()
    before = int(observer.info("stats")["total_connections_received"])

    async def test(connection: PipelinedConnection) -> list[bytes]:
        return await asyncio.gather(*(connection.execute("ECHO", f"reply-{i}") for i in range(500)))

    replies = run(test, redis_server.url)
    assert replies == [f"reply-{i}".encode() for i in range(500)]
    assert int(observer.info("stats")["total_connections_received"]) - before == 1


def test_an_error_reply_fails_its_caller_only(redis_server: RedisServer) -> None:
    async def test(connection: PipelinedConnection) -> list[object]:
        return await asyncio.gather(
            connection.execute("ECHO", "before"),
            connection.execute("NOT-A-COMMAND"),
            connection.execute("EVALSHA", "0" * 40, 0),
            connection.execute("ECHO", "after"),
            return_exceptions=True,
        )

    before, unknown, noscript, after = run(test, redis_server.url)
    assert (before, after) == (b"before", b"after")
    assert isinstance(unknown, ResponseError) and "unknown command" in str(unknown)
    assert isinstance(noscript, NoScriptError)


def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(redis_server: RedisServer) -> None:
    async def test(connection: PipelinedConnection) -> list[bytes]:
        calls = [asyncio.ensure_future(connection.execute("ECHO", str(i))) for i in range(10)]
        calls[3].cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        return [await c for i, c in enumerate(calls) if i != 3] + [await connection.execute("ECHO", "next")]

    assert run(test, redis_server.url) == [str(i).encode() for i in range(10) if i != 3] + [b"next"]


def test_selects_the_database_and_authenticates_as_the_url_says() -> None:
    with RedisServer() as server:
        server.client().config_set("requirepass", "s3cret")
        server.client(password="s3cret").set("where", "db0")
        server.client(password="s3cret", db=2).set("where", "db2")

        async def test(connection: PipelinedConnection) -> bytes:
            return await connection.execute("GET", "where")

        assert run(test, f"redis://:s3cret@127.0.0.1:{server.port}/2") == b"db2"
        with pytest.raises(AuthenticationError):
            run(test, f"redis://:wrong@127.0.0.1:{server.port}/2")


def test_redis_killed_fails_the_waiting_callers_and_the_next_call_reconnects() -> None:
    with RedisServer() as server:

        async def test(connection: PipelinedConnection) -> tuple[BaseException | None, bytes]:
            assert await connection.execute("PING") == b"PONG"
            server.kill()
            failure: BaseException | None = None
            try:
                await connection.execute("PING")
            except RedisConnectionError as exc:
                failure = exc
            server.start()
            return failure, await connection.execute("PING")

        failure, after_restart = run(test, server.url)
        assert isinstance(failure, RedisConnectionError)
        assert after_restart == b"PONG"


def test_a_stalled_redis_fails_the_callers_after_the_timeout_and_recovers() -> None:
    with RedisServer() as server:
        pid = server._processes[0].pid

        async def test(connection: PipelinedConnection) -> tuple[type[BaseException], float, bytes]:
            assert await connection.execute("PING") == b"PONG"
            os.kill(pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                with pytest.raises(RedisTimeoutError) as caught:
                    await connection.execute("PING")
            finally:
                os.kill(pid, signal.SIGCONT)
            waited = loop.time() - started
            return caught.type, waited, await connection.execute("PING")

        error, waited, after = run(test, server.url, timeout_s=0.3)
        assert error is OutcomeUnknownError  # a RedisTimeoutError: the PING had been sent, redis may run it
        assert 0.3 <= waited < 2.0  # one timeout, up to one more for a call sent just after the timer was armed
        assert after == b"PONG"


def test_a_call_s_own_timeout_fails_that_call_only_saying_it_was_sent() -> None:
    with RedisServer() as server:
        pid = server._processes[0].pid

        async def test(connection: PipelinedConnection) -> tuple[float, bytes]:
            assert await connection.execute("PING") == b"PONG"
            os.kill(pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                with pytest.raises(OutcomeUnknownError, match="redis did not answer within 0.20 s"):
                    await connection.execute("INCR", "counter", timeout_s=0.2)
                waited = loop.time() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            return waited, await connection.execute("GET", "counter")

        waited, counter = run(test, server.url, timeout_s=5.0)
        assert waited < 1.0  # the call's own bound, not the connection's 5 s
        assert counter == b"1"  # the INCR given up on ran when redis woke, on the same connection


def test_only_plain_redis_urls_are_pipelined() -> None:
    assert PipelinedConnection.from_url("rediss://127.0.0.1:6379/0", timeout_s=1) is None
    assert PipelinedConnection.from_url("unix:///tmp/redis.sock", timeout_s=1) is None
    connection = PipelinedConnection.from_url("redis://user:pw@10.0.0.1:6380/3", timeout_s=1)
    assert connection is not None and (connection.host, connection.port, connection.db) == ("10.0.0.1", 6380, 3)


# --- waiting for replicas (WAIT) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def with_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    group = SentinelGroup().start_replication()  # its primary and replica, no Sentinels
    yield group.primary, group.replica
    group.close()


def run_replicated(test: Callable[[PipelinedConnection], Awaitable[T]], url: str, wait_s: float) -> T:
    async def main() -> T:
        connection = PipelinedConnection.from_url(url, timeout_s=3.0, min_replicas=1, replica_wait_s=wait_s)
        assert connection is not None
        try:
            return await test(connection)
        finally:
            await connection.close()

    return asyncio.run(main())


def test_a_replicated_command_is_answered_once_the_replica_holds_it(
    with_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = with_replica

    async def test(connection: PipelinedConnection) -> list[object]:
        return await asyncio.gather(*(connection.execute("SET", f"r{i}", i, replicate=True) for i in range(50)))

    assert run_replicated(test, primary.url, wait_s=2.0) == [b"OK"] * 50
    with replica.client() as conn:
        assert conn.get("r49") == "49"  # answered only once the replica had it: no wait needed here


def test_without_its_replica_a_replicated_command_runs_but_is_not_answered_ok(
    with_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = with_replica

    async def test(connection: PipelinedConnection) -> list[object]:
        return await asyncio.gather(
            *(connection.execute("SET", "unconfirmed", i, replicate=True) for i in range(3)), return_exceptions=True
        )

    replica.pause()
    try:
        answers = run_replicated(test, primary.url, wait_s=0.2)
    finally:
        replica.resume()
    assert all(isinstance(a, NotReplicatedError) and a.acks == 0 and a.reply == b"OK" for a in answers), answers
    with primary.client() as conn:
        assert conn.get("unconfirmed") == "2"  # Redis ran them: "not confirmed", never "not done"


def test_a_replicated_command_given_up_while_its_wait_is_out_says_it_may_have_run(
    with_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = with_replica

    async def test(connection: PipelinedConnection) -> BaseException | None:
        call = connection.execute("SET", "ran-then-given-up", 1, timeout_s=0.3, replicate=True)
        (answer,) = await asyncio.gather(call, return_exceptions=True)
        return answer if isinstance(answer, BaseException) else None

    replica.pause()
    try:
        answer = run_replicated(test, primary.url, wait_s=2.0)
    finally:
        replica.resume()
    # Redis ran the SET and answered it; only its WAIT was out when the call's own time ran out.
    assert isinstance(answer, OutcomeUnknownError), repr(answer)
    with primary.client() as conn:
        assert conn.get("ran-then-given-up") == "1"


def test_a_wait_for_the_replica_holds_up_no_command_of_a_later_turn(
    with_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = with_replica

    async def test(connection: PipelinedConnection) -> tuple[bool, bytes, object]:
        blocked = asyncio.ensure_future(connection.execute("SET", "blocked", 1, replicate=True))
        with primary.client() as observer:
            while int(observer.info("clients")["blocked_clients"]) < 1:  # the SET's WAIT is waiting
                await asyncio.sleep(0.01)
        read = await connection.execute("ECHO", "next turn")  # on another connection, at once
        return blocked.done(), read, await asyncio.gather(blocked, return_exceptions=True)

    replica.pause()
    try:
        done_before_read, read, (blocked,) = run_replicated(test, primary.url, wait_s=2.0)
    finally:
        replica.resume()
    assert read == b"next turn" and not done_before_read
    assert isinstance(blocked, NotReplicatedError)


def test_commands_held_behind_a_wait_go_out_together_under_one_wait(
    with_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = with_replica

    async def test() -> tuple[list[object], object, int]:
        connection = PipelinedConnection(
            primary.host, primary.port, timeout_s=5.0, min_replicas=1, replica_wait_s=4.0, connections=1
        )
        try:
            await connection.execute("PING")
            with primary.client() as observer:
                observer.config_resetstat()
                first = asyncio.ensure_future(connection.execute("SET", "held-0", 0, replicate=True))
                while int(observer.info("clients")["blocked_clients"]) < 1:  # its WAIT is out
                    await asyncio.sleep(0.01)
                later = []
                for i in range(1, 6):  # each in a turn of its own
                    later.append(asyncio.ensure_future(connection.execute("SET", f"held-{i}", i, replicate=True)))
                    await asyncio.sleep(0)
                given_up = connection.execute("SET", "given-up", 1, replicate=True, timeout_s=0.1)
                gave_up = (await asyncio.gather(given_up, return_exceptions=True))[0]
                replica.resume()
                answers = await asyncio.gather(first, *later)
                waits = int(observer.info("commandstats")["cmdstat_wait"]["calls"])
            return answers, gave_up, waits
        finally:
            await connection.close()

    replica.pause()
    try:
        answers, gave_up, waits = asyncio.run(test())
    finally:
        replica.resume()
    assert answers == [b"OK"] * 6
    assert waits == 2  # the first write's, and one for the five held behind it
    # Given up while held, it never went out: "not sent" was the truth.
    assert isinstance(gave_up, RedisTimeoutError) and not isinstance(gave_up, OutcomeUnknownError)
    with primary.client() as conn:
        assert conn.get("given-up") is None
