"""One Redis connection shared by every caller of a process, commands pipelined per event-loop turn.

redis-py's asyncio client takes a connection from its pool for each command or pipeline, arms a
timeout and waits for the reply on that connection; redis-py has no shared, auto-pipelined
connection. Under the allocator's load, where grpc.aio starts about one call per loop turn, that
bookkeeping cost more CPU than the script itself (bench/README.md). Here the commands of a loop
turn go out in one write on one connection, hiredis parses the replies, and they are handed to the
callers in order (Redis answers a connection's commands in the order they came).

A command sent with `replicate=True` is answered only once `WAIT n timeout`, appended after the
last such command of its write, says that n replicas hold it (one WAIT per write, not per command:
WAIT covers everything the connection wrote before it). WAIT blocks its connection until the
replicas answer, so with replicas to wait for the commands go over a few connections, each turn's to
one whose WAIT has answered: Redis runs one turn's scripts while another's wait for the replicas.
When every connection waits, a connection's new commands are held until its WAIT answers, then go
out together under one WAIT (a group commit: the busier, the fewer WAITs per command).

Used for the pool scripts on a single Redis or the master that Sentinel names (`redis://` URLs);
Redis Cluster, TLS and everything else go through redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The host and port to connect to, asked again on every (re)connection (Sentinel's current master).
Resolver = Callable[[], Awaitable[tuple[str, int]]]


class OutcomeUnknownError(RedisTimeoutError, RedisConnectionError):
    """The command was written to Redis and no answer came (a timeout, or the connection lost): Redis
    may run it, or have run it, anyway.

    A Redis that stalls (SIGSTOP, a slow fork, a failover) still holds the bytes in its socket and
    runs the command when it wakes, so this is not "nothing happened"."""


class NotReplicatedError(OutcomeUnknownError):
    """Redis ran the command, but fewer replicas than asked confirmed it within the wait: a failover
    may lose it. `reply` is what the command answered."""

    def __init__(self, message: str, *, reply: Any, acks: int) -> None:
        super().__init__(message)
        self.reply = reply
        self.acks = acks


class _RespProtocol(asyncio.Protocol):
    """A connection's two queues: commands not yet written, callers whose reply has not come."""

    def __init__(self, timeout_s: float, min_replicas: int = 0, replica_wait_s: float = 0.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._min_replicas = min_replicas
        self._replica_wait_s = replica_wait_s
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._unsent: list[bytes] = []
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._written = 0  # of `_waiting`, how many (from the left) were written to the socket
        self._replies = 0  # replies read so far: the watchdog's sign of progress
        self._watchdog: asyncio.TimerHandle | None = None
        # Commands of the unsent write that wait for replicas, with the least time any may wait.
        self._unsent_replicated: list[asyncio.Future[Any]] = []
        self._unsent_wait_s = 0.0
        # A replicated command's reply, held until its WAIT answers; a WAIT's commands.
        self._held: dict[asyncio.Future[Any], Any] = {}
        self._wait_groups: dict[asyncio.Future[Any], list[asyncio.Future[Any]]] = {}
        self._deferred = False  # a flush waits for the WAIT out to answer
        self.closed = False
        self.retired = False  # talks to a replica now: new commands go to a new connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    @property
    def usable(self) -> bool:
        return not (self.closed or self.retired)

    @property
    def waiting_for_replicas(self) -> bool:
        """A WAIT of this connection is out and has not answered (its connection is blocked)."""
        return bool(self._wait_groups)

    @property
    def load(self) -> int:
        return len(self._waiting)

    def send(self, packed: bytes, timeout_s: float | None = None, replicate: bool = False) -> asyncio.Future[Any]:
        """Queues one command; `timeout_s` (below the connection's timeout) bounds this caller's wait alone.
        `replicate`: answer only once the connection's replicas hold it (see the module's docstring)."""
        if self.closed:
            raise RedisConnectionError("the connection to redis is closed")
        future = self._loop.create_future()
        if not self._unsent:
            self._loop.call_soon(self._flush)
        self._unsent.append(packed)
        self._waiting.append(future)
        if replicate and self._min_replicas > 0:
            wait_s = self._replica_wait_s if timeout_s is None else min(self._replica_wait_s, timeout_s)
            self._unsent_wait_s = min(self._unsent_wait_s, wait_s) if self._unsent_replicated else wait_s
            self._unsent_replicated.append(future)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout_s, self._check_progress, self._replies)
        if timeout_s is not None and timeout_s < self._timeout_s:
            timer = self._loop.call_later(max(timeout_s, 0.0), self._give_up, future, timeout_s)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def _give_up(self, future: asyncio.Future[Any], timeout_s: float) -> None:
        # The reply, if it comes, is dropped (`data_received` skips done futures).
        if not future.done():
            # Written, or answered and held until its WAIT answers: either way Redis may have run it.
            sent = future in self._held or any(self._waiting[i] is future for i in range(self._written))
            if not sent:
                self._drop_unsent(future)  # held behind a WAIT: it must never go out now
            future.set_exception(self._no_answer(sent, f"redis did not answer within {timeout_s:.2f} s"))

    def _drop_unsent(self, future: asyncio.Future[Any]) -> None:
        for index in range(self._written, len(self._waiting)):
            if self._waiting[index] is future:
                del self._waiting[index]
                del self._unsent[index - self._written]
                if future in self._unsent_replicated:
                    self._unsent_replicated.remove(future)
                return

    @staticmethod
    def _no_answer(sent: bool, what: str) -> Exception:
        if sent:
            return OutcomeUnknownError(f"{what}; the command had been sent, redis may still run it")
        return RedisTimeoutError(f"{what}; the command had not been sent")

    def _flush(self) -> None:
        if self._wait_groups and self._unsent and not self.closed:
            self._deferred = True  # behind the WAIT out: sent, under one WAIT, once it answers
            return
        self._deferred = False
        if self._unsent_replicated and not self.closed:
            # WAIT's timeout 0 would block for ever: at least 1 ms.
            wait_ms = max(1, int(self._unsent_wait_s * 1000))
            waiter = self._loop.create_future()
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # failures go to its commands
            self._unsent.append(hiredis.pack_command(("WAIT", self._min_replicas, wait_ms)))
            self._waiting.append(waiter)
            self._wait_groups[waiter] = self._unsent_replicated
            self._held.update(dict.fromkeys(self._unsent_replicated, None))
            self._unsent_replicated = []
        if self._unsent and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._unsent))
            self._written = len(self._waiting)
        self._unsent.clear()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._replies += 1
            future = self._waiting.popleft()
            self._written -= 1
            group = self._wait_groups.pop(future, None)
            if group is not None:
                self._answer_group(group, reply)
                continue
            held = future in self._held
            if future.done():  # the caller gave up (cancelled): its reply is dropped
                self._held.pop(future, None)
                continue
            if isinstance(reply, hiredis.ReplyError):
                self._held.pop(future, None)
                error = BaseParser.parse_error(str(reply))  # NOSCRIPT -> NoScriptError, ...
                if isinstance(error, ReadOnlyError):
                    self.retired = True  # a failover made this Redis a replica
                future.set_exception(error)
            elif held:
                self._held[future] = reply
            else:
                future.set_result(reply)
        if self._deferred and not self._wait_groups:
            self._flush()
        if self.retired and not self._waiting:
            self.close()

    def _answer_group(self, group: list[asyncio.Future[Any]], acks: Any) -> None:
        """Answers the commands a WAIT covered: their replies if enough replicas confirmed, else
        `NotReplicatedError`."""
        count = acks if isinstance(acks, int) else 0
        for future in group:
            reply = self._held.pop(future, None)
            if future.done():
                continue
            if count >= self._min_replicas:
                future.set_result(reply)
            else:
                detail = f"WAIT failed: {acks}" if isinstance(acks, hiredis.ReplyError) else f"{count}"
                future.set_exception(
                    NotReplicatedError(
                        f"redis ran the change, but only {detail} of the {self._min_replicas} replicas asked "
                        "for confirmed it in time: a failover may lose it",
                        reply=reply,
                        acks=count,
                    )
                )

    def _check_progress(self, replies_before: int) -> None:
        # One timer per connection instead of one per call: Redis must answer something within the
        # timeout while commands wait; a Redis that stalls that long fails every waiting caller.
        self._watchdog = None
        if not self._waiting:
            return
        if self._replies == replies_before:
            self._fail(f"redis did not answer within {self._timeout_s:g} s", timeout=True)
            if self._transport is not None:
                self._transport.abort()
            return
        self._watchdog = self._loop.call_later(self._timeout_s, self._check_progress, self._replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"the connection to redis was lost: {exc or 'closed by redis'}")

    def _fail(self, what: str, *, timeout: bool = False) -> None:
        # Commands already written may still run (or have run); the others provably never left.
        self.closed = True
        self._unsent.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        written, self._written = self._written, 0
        # Commands that ran and whose WAIT had not answered: no longer in `_waiting`, failed here.
        for group in self._wait_groups.values():
            for future in group:
                if future in self._held and not future.done():
                    future.set_exception(self._no_answer(True, what))
        self._held.clear()
        self._wait_groups.clear()
        self._unsent_replicated = []
        unsent: Exception = RedisTimeoutError(what) if timeout else RedisConnectionError(what)
        while self._waiting:
            future = self._waiting.popleft()
            sent = written > 0
            written -= 1
            if not future.done():
                future.set_exception(self._no_answer(True, what) if sent else unsent)

    def close(self) -> None:
        self._fail("the connection to redis is closed")
        if self._transport is not None:
            self._transport.close()


class PipelinedConnection:
    """`execute(*args)` from any number of tasks; (re)connects on first use after a failure.

    `resolve` names the server on every (re)connection (Sentinel's master), else `host`:`port`.
    `min_replicas`, `replica_wait_s`: what `execute(..., replicate=True)` waits for; with replicas to
    wait for, up to `connections` (default 4) connections are used, else one."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        resolve: Resolver | None = None,
        min_replicas: int = 0,
        replica_wait_s: float = 0.0,
        connections: int = 4,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self._username, self._password = username, password
        self._resolve = resolve
        self._timeout_s = timeout_s
        self.min_replicas = min_replicas
        self._replica_wait_s = replica_wait_s
        count = max(connections, 1) if min_replicas > 0 else 1
        self._protocols: list[_RespProtocol | None] = [None] * count
        self._connecting: list[asyncio.Future[_RespProtocol] | None] = [None] * count

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        resolve: Resolver | None = None,
        min_replicas: int = 0,
        replica_wait_s: float = 0.0,
    ) -> PipelinedConnection | None:
        """A connection for a plain `redis://` URL (its host is ignored with `resolve`); None for the
        others (TLS, unix sockets)."""
        if urlsplit(url).scheme != "redis":
            return None
        options = parse_url(url)
        return cls(
            options.get("host", "127.0.0.1"),
            int(options.get("port", 6379)),
            timeout_s=timeout_s,
            db=int(options.get("db", 0)),
            username=options.get("username"),
            password=options.get("password"),
            resolve=resolve,
            min_replicas=min_replicas,
            replica_wait_s=replica_wait_s,
        )

    async def execute(self, *args: Any, timeout_s: float | None = None, replicate: bool = False) -> Any:
        """Sends one command with the others of this loop turn; its reply, or Redis's error raised.

        Without an answer: `OutcomeUnknownError` when the command was written (Redis may still run
        it), another `TimeoutError` / `ConnectionError` when it never left. `timeout_s` bounds this
        call's wait when it is shorter than the connection's timeout. `replicate`: the reply only once
        `min_replicas` replicas hold the command, else `NotReplicatedError`."""
        protocol = self._pick()
        if protocol is None:
            try:
                async with asyncio.timeout(timeout_s):
                    protocol = await self._connected()
            except TimeoutError:
                raise RedisTimeoutError(f"no connection to redis within {timeout_s:.2f} s") from None
        return await protocol.send(hiredis.pack_command(args), timeout_s, replicate)

    def _pick(self) -> _RespProtocol | None:
        """A connection not blocked by a WAIT, else None while one may still be made, else the least busy."""
        usable = [p for p in self._protocols if p is not None and p.usable]
        idle = next((p for p in usable if not p.waiting_for_replicas), None)
        if idle is not None:
            return idle
        if len(usable) < len(self._protocols):
            return None
        return min(usable, key=lambda p: p.load)

    async def _connected(self) -> _RespProtocol:
        # The first slot without a usable connection; callers arriving while it is being made wait for it.
        index = next(i for i, p in enumerate(self._protocols) if p is None or not p.usable)
        connecting = self._connecting[index]
        if connecting is None:
            connecting = self._connecting[index] = asyncio.ensure_future(self._connect(index))
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting[index] is connecting:
                self._connecting[index] = None

    async def _connect(self, index: int) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._resolve is not None:
                    self.host, self.port = await self._resolve()
                wait = (self.min_replicas, self._replica_wait_s)
                _, protocol = await loop.create_connection(
                    lambda: _RespProtocol(self._timeout_s, *wait), self.host, self.port
                )
                handshake = []
                if self._password:
                    auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                    handshake.append(protocol.send(hiredis.pack_command(auth)))
                if self.db:
                    handshake.append(protocol.send(hiredis.pack_command(("SELECT", self.db))))
                failures = [
                    r for r in await asyncio.gather(*handshake, return_exceptions=True) if isinstance(r, Exception)
                ]
                if failures:
                    protocol.close()
                    raise failures[0]
        except TimeoutError:
            raise RedisTimeoutError(
                f"no connection to redis at {self.host}:{self.port} within {time.monotonic() - started:.1f} s"
            ) from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to redis at {self.host}:{self.port}: {exc}") from exc
        self._protocols[index] = protocol
        return protocol

    async def close(self) -> None:
        for index, protocol in enumerate(self._protocols):
            if protocol is not None:
                protocol.close()
                self._protocols[index] = None
