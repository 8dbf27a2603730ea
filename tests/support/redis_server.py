"""Real redis-server processes for tests: a single server (optionally with AOF), a primary with a
replica watched by Sentinels, or a small cluster (optionally with replicas).

Every process listens on 127.0.0.1 only, on a free port, in its own temporary directory. Use them as
context managers (or call `close()`); anything left running is killed when the interpreter exits.

    with RedisServer(aof=True) as redis_server:
        ...                          # redis_server.url == "redis://127.0.0.1:<port>/0"
        redis_server.kill()          # SIGKILL: a crash
        redis_server.restart()       # same port and dir: the AOF is replayed
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
_POLL_INTERVAL = 0.01
_PORT_ATTEMPTS = 3
# Set by `make test`: there, a missing redis-server is a broken setup, not a reason to skip.
REQUIRE_ENV = "IPAM_TESTS_REQUIRE_REDIS"


def require_redis_server() -> None:
    """Skips the calling test when redis-server is not installed (fails instead under `make test`)."""
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return
    message = "redis-server is not installed: run `make setup`"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, attempts: int = 20) -> int:
    """The first of `count` consecutive TCP ports on 127.0.0.1 that nobody uses right now."""
    for _ in range(attempts):
        first = free_port()
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((HOST, port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found in {attempts} attempts")


def _poll_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Call `condition` until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        time.sleep(_POLL_INTERVAL)


def _flags(options: dict[str, str]) -> list[str]:
    """{"port": "6379"} -> ["--port", "6379"] (redis-server takes any config directive this way)."""
    return [arg for name, value in options.items() for arg in (f"--{name}", value)]


def _cleanup(processes: list[subprocess.Popen[bytes]], tmpdir: str | None) -> None:
    # Runs once: from close(), when the object is collected, or at interpreter exit.
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


class RedisServer:
    """One redis-server process on 127.0.0.1, without RDB snapshots, optionally with an fsync-always AOF."""

    def __init__(
        self,
        *,
        aof: bool = False,
        dir: str | Path | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        require_redis_server()
        self.aof = aof
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._fixed_port = port is not None
        self._port = port or 0
        tmpdir = None if dir is not None else tempfile.mkdtemp(prefix="ipam-redis-")
        self.dir = Path(dir) if dir is not None else Path(str(tmpdir))
        # The list holds the current process; the finalizer kills whatever is in it.
        self._processes: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._processes, tmpdir)

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def _console_path(self) -> Path:
        # Errors before the logfile is opened (bad options) go to stderr: kept here.
        return self.dir / "redis.console"

    @property
    def pid(self) -> int:
        """The process id of the running server (to SIGSTOP it)."""
        return self._processes[0].pid

    @property
    def running(self) -> bool:
        return bool(self._processes) and self._processes[0].poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process holds its sockets and answers nothing (a stalled or lagging host)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        os.kill(self.pid, signal.SIGCONT)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process and return once it answers PING. Idempotent while running."""
        if self.running:
            return self
        if self._port:
            self._spawn()
            return self
        # A port picked by free_port() can be taken by someone else before redis binds it: retry.
        for attempt in range(_PORT_ATTEMPTS):
            self._port = free_port()
            try:
                self._spawn()
                return self
            except RuntimeError:
                if attempt + 1 == _PORT_ATTEMPTS or "Address already in use" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: the AOF is flushed); SIGKILL if it takes longer than `timeout`."""
        if not self.running:
            return
        process = self._processes[0]
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed beyond what was already fsynced."""
        if not self.running:
            return
        process = self._processes[0]
        process.kill()
        process.wait()

    def restart(self) -> Self:
        """Stop (gracefully, if still running) and start again on the same port and dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Kill the process and remove the temporary directory (a dir passed in is kept)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------------------

    def client(self, **kwargs: object) -> redis.Redis:
        """A blocking redis-py client of this server (decode_responses=True unless overridden)."""
        kwargs.setdefault("decode_responses", True)
        return redis.Redis(host=HOST, port=self.port, **kwargs)  # type: ignore[arg-type]

    def ping(self) -> bool:
        """True when the server answers PING (False while down or still loading its AOF)."""
        # No retries: redis-py's default retry policy would turn one failed probe into seconds.
        probe = redis.Redis(
            host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            with probe:
                return bool(probe.ping())
        except redis.RedisError:
            return False

    def _command_line(self) -> list[str]:
        options = {
            "bind": HOST,
            "port": str(self._port),
            "dir": str(self.dir),
            "logfile": str(self.log_path),
            "daemonize": "no",
            "save": "",
        }
        if self.aof:
            options |= {"appendonly": "yes", "appendfsync": "always"}
        return [REDIS_SERVER, *_flags(options), *self.extra_args]

    def _spawn(self) -> None:
        with self._console_path.open("ab") as console:
            process = subprocess.Popen(
                self._command_line(), stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
            )
        self._processes[:] = [process]

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self._port} exited with {process.returncode}:\n{self._log_tail()}"
                )
            return self.ping()

        try:
            _poll_until(ready, self.startup_timeout, f"PING on redis-server port {self._port}")
        except TimeoutError:
            self.kill()
            raise

    def _log_tail(self, lines: int = 20) -> str:
        tail: list[str] = []
        for path in (self._console_path, self.log_path):
            if path.exists():
                tail += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(tail) or "(no log)"


def _info(server: RedisServer, section: str) -> dict[str, Any]:
    try:
        with server.client(socket_timeout=1, retry=Retry(NoBackoff(), 0)) as conn:
            return dict(conn.info(section))
    except redis.RedisError:
        return {}


class RedisSentinel(RedisServer):
    """One Sentinel (`redis-server <conf> --sentinel`) watching `master` under `name`."""

    def __init__(
        self, name: str, master: RedisServer, *, down_after_ms: int, port: int, quorum: int = 2, known: str = ""
    ) -> None:
        """`known`: config lines naming the replica and the other Sentinels, so that the group is ready
        at once instead of after their discovery (INFO every 10 s, hello every 2 s)."""
        super().__init__(port=port)
        self.name, self.master, self.down_after_ms, self.quorum = name, master, down_after_ms, quorum
        self.known = known
        self.myid = f"{port:040x}"

    def _command_line(self) -> list[str]:
        # Sentinel rewrites its config file, so it must be one of its own.
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"bind {HOST}\nport {self._port}\ndir {self.dir}\nlogfile {self.log_path}\n"
            f"sentinel myid {self.myid}\n"
            f"sentinel monitor {self.name} {HOST} {self.master.port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.name} {max(self.down_after_ms * 4, 2000)}\n"
            f"{self.known}"
        )
        return [REDIS_SERVER, str(conf), "--sentinel"]

    def master_address(self) -> tuple[str, int] | None:
        try:
            with self.client(socket_timeout=1, retry=Retry(NoBackoff(), 0)) as conn:
                reply = conn.execute_command("SENTINEL", "get-master-addr-by-name", self.name)
        except redis.RedisError:
            return None
        return (str(reply[0]), int(reply[1])) if reply else None


class SentinelGroup:
    """A primary, its replica (both with an fsync-always AOF) and three Sentinels, on 127.0.0.1.

    `down_after_ms` is how long the Sentinels wait before they take the primary for down."""

    def __init__(self, name: str = "ipam", *, down_after_ms: int = 500, replica_args: Sequence[str] = ()) -> None:
        self.name = name
        # Without the default 5 s delay before a replica's full sync (and so before it is in sync).
        fast_sync = ["--repl-diskless-sync-delay", "0"]
        self.primary = RedisServer(aof=True, extra_args=fast_sync)
        self.replica = RedisServer(aof=True, extra_args=[*fast_sync, *replica_args])
        self._down_after_ms = down_after_ms
        self.sentinels: list[RedisSentinel] = []

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    @property
    def sentinel_addresses(self) -> str:
        """`host:port,...` of the Sentinels (IPAM_REDIS_SENTINELS)."""
        return ",".join(f"{s.host}:{s.port}" for s in self.sentinels)

    def start_replication(self) -> Self:
        """Start the primary and its replica, and return once the replica is in sync (no Sentinels)."""
        try:
            self.primary.start()
            self.replica.extra_args += ["--replicaof", HOST, str(self.primary.port)]
            self.replica.start()
            self.wait_in_sync()
        except BaseException:
            self.close()
            raise
        return self

    def start(self) -> Self:
        """Start the primary, the replica (in sync), then the Sentinels (once they all see both)."""
        self.start_replication()
        try:
            ports = [free_port() for _ in range(3)]
            known = [f"sentinel known-replica {self.name} {HOST} {self.replica.port}\n"] * 3
            for i, port in enumerate(ports):
                for other in ports:
                    if other != port:
                        known[i] += f"sentinel known-sentinel {self.name} {HOST} {other} {other:040x}\n"
            self.sentinels = [
                RedisSentinel(self.name, self.primary, down_after_ms=self._down_after_ms, port=port, known=known[i])
                for i, port in enumerate(ports)
            ]
            for sentinel in self.sentinels:
                sentinel.start()
            for sentinel in self.sentinels:
                _poll_until(lambda s=sentinel: self._sees_everyone(s), 20, f"sentinel {sentinel.port} ready")
        except BaseException:
            self.close()
            raise
        return self

    def _sees_everyone(self, sentinel: RedisSentinel) -> bool:
        try:
            with sentinel.client(socket_timeout=1, retry=Retry(NoBackoff(), 0)) as conn:
                master = conn.execute_command("SENTINEL", "MASTER", self.name)
        except redis.RedisError:
            return False
        fields = dict(zip(master[::2], master[1::2], strict=False)) if isinstance(master, list) else master
        return int(fields.get("num-slaves", 0)) >= 1 and int(fields.get("num-other-sentinels", 0)) >= 2

    def master(self) -> RedisServer | None:
        """The server the Sentinels name master now (None while they disagree or are unreachable)."""
        answers = {s.master_address() for s in self.sentinels if s.running}
        if len(answers) != 1 or None in answers:
            return None
        (_, port) = answers.pop()  # type: ignore[misc]
        return next((s for s in self.servers if s.port == port), None)

    def rejoin(self, server: RedisServer) -> None:
        """Starts `server` again (say, the primary that was killed) as a replica of the master now,
        as a supervisor would bring it back, and returns once it replicates (its full sync done)."""
        master = self.master()
        assert master is not None and master is not server, "no other master to follow"
        server.extra_args = ["--repl-diskless-sync-delay", "0", "--replicaof", HOST, str(master.port)]
        server.start()

        def online() -> bool:
            replica = _info(master, "replication").get("slave0")
            return bool(replica) and replica["port"] == server.port and replica["state"] == "online"

        # Online, not "in sync": under writes the offsets it acknowledges trail the master's.
        _poll_until(online, 10, f"redis-server {server.port} replicating {master.port}")

    def wait_in_sync(self, master: RedisServer | None = None, timeout: float = 10.0) -> None:
        """Until `master`'s (by default the primary's) replica has everything it wrote."""

        def in_sync() -> bool:
            info = _info(master or self.primary, "replication")
            replica = info.get("slave0")
            return bool(replica) and replica["state"] == "online" and replica["offset"] == info["master_repl_offset"]

        _poll_until(in_sync, timeout, "the replica in sync with the primary")

    def wait_promoted(self, server: RedisServer, timeout: float = 20.0) -> None:
        """Until every Sentinel names `server` master and it says it is one."""

        def promoted() -> bool:
            return self.master() is server and _info(server, "replication").get("role") == "master"

        _poll_until(promoted, timeout, f"redis-server {server.port} promoted")

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            with contextlib.suppress(OSError):
                if process.running:
                    process.resume()  # a paused process does not die of SIGKILL until it runs
            process.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisCluster:
    """A Redis Cluster of `masters` masters, each with `replicas` replicas, on 127.0.0.1, created with
    `redis-cli --cluster`."""

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas: int = 0,
        aof: bool = False,
        node_timeout_ms: int = 5000,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        require_redis_server()
        self.startup_timeout = startup_timeout
        self.replicas = replicas
        self.nodes: list[RedisServer] = [
            RedisServer(
                aof=aof,
                startup_timeout=startup_timeout,
                extra_args=_flags(
                    {
                        "cluster-enabled": "yes",
                        "cluster-config-file": "nodes.conf",
                        "cluster-node-timeout": str(node_timeout_ms),
                        # The bus port is fixed once so a restarted node keeps its identity and address.
                        "cluster-port": str(free_port()),
                        "repl-diskless-sync-delay": "0",
                    }
                )
                + list(extra_args),
            )
            for _ in range(masters * (1 + replicas))
        ]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for `RedisCluster(startup_nodes=...)` of any client library."""
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port of the first master>`; cluster clients discover the others."""
        return f"redis://{HOST}:{self.nodes[0].port}"

    def start(self) -> Self:
        """Start every node, create the cluster, and return once every node reports cluster_state:ok."""
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"{host}:{port}" for host, port in self.startup_nodes]
            create = subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=self.startup_timeout,
                stdin=subprocess.DEVNULL,
            )
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")
            self.wait_until_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_until_ok(self, timeout: float | None = None) -> None:
        """Poll CLUSTER INFO on every running node until each says cluster_state:ok (e.g. after a restart)."""
        for node in self.nodes:
            if not node.running:
                continue
            _poll_until(
                lambda node=node: _cluster_state(node) == "ok",
                self.startup_timeout if timeout is None else timeout,
                f"cluster_state:ok on port {node.port}",
            )

    def master_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s slot now."""
        for node in self.nodes:
            if node.running and _info(node, "replication").get("role") == "master":
                with node.client(socket_timeout=1, retry=Retry(NoBackoff(), 0)) as conn:
                    slot = int(conn.execute_command("CLUSTER", "KEYSLOT", key))
                    for start, end, (_, port, *_rest), *_ in conn.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            return next(n for n in self.nodes if n.port == int(port))
        raise RuntimeError(f"no running node serves {key!r}")

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A replica of `master` (from the master's INFO replication)."""
        port = int(_info(master, "replication")["slave0"]["port"])
        return next(n for n in self.nodes if n.port == port)

    def wait_replica_in_sync(self, master: RedisServer, timeout: float = 10.0) -> None:
        """Until `master`'s first replica has acknowledged everything it wrote."""

        def in_sync() -> bool:
            info = _info(master, "replication")
            replica = info.get("slave0")
            return bool(replica) and replica["state"] == "online" and replica["offset"] == info["master_repl_offset"]

        _poll_until(in_sync, timeout, f"the replica of {master.port} in sync")

    def wait_serves(self, key: str, node: RedisServer, timeout: float = 20.0) -> None:
        """Until the running nodes agree that `node` serves `key`'s slot, and the cluster is ok."""

        def serves() -> bool:
            try:
                return self.master_of(key) is node and _cluster_state(node) == "ok"
            except (redis.RedisError, RuntimeError):
                return False

        _poll_until(serves, timeout, f"{node.port} serving {key!r}")

    def stop(self) -> None:
        """Stop every node gracefully (their dirs are kept: `start()` on a node brings it back)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes:
            with contextlib.suppress(OSError):
                if node.running:
                    node.resume()
            node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _cluster_state(node: RedisServer) -> str:
    try:
        with node.client(socket_timeout=1, retry=Retry(NoBackoff(), 0)) as conn:
            info = conn.execute_command("CLUSTER INFO")
    except redis.RedisError:
        return "unreachable"
    if isinstance(info, dict):  # redis-py may already parse the reply
        return str(info.get("cluster_state", ""))
    for line in str(info).splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return ""


def pool_libraries(client: redis.Redis) -> set[str]:
    """The names of the allocator's libraries that Redis holds."""
    names = {dict(zip(entry[::2], entry[1::2], strict=True))["library_name"] for entry in client.function_list()}
    return {name for name in names if name.startswith("ipam_pool_")}
