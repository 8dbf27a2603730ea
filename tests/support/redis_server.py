"""Real redis-server processes for tests: a single server (optionally with AOF) or a small cluster.

Every process listens on 127.0.0.1 only, on a free port, in its own temporary directory. Use them as
context managers (or call `close()`); anything left running is killed when the interpreter exits.

    with RedisServer(aof=True) as redis_server:
        ...                          # redis_server.url == "redis://127.0.0.1:<port>/0"
        redis_server.kill()          # SIGKILL: a crash
        redis_server.restart()       # same port and dir: the AOF is replayed
"""

from __future__ import annotations

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
from typing import Self

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


class RedisCluster:
    """A Redis Cluster of `masters` masters (no replicas) on 127.0.0.1, created with `redis-cli --cluster`."""

    def __init__(
        self,
        masters: int = 3,
        *,
        aof: bool = False,
        node_timeout_ms: int = 5000,
        startup_timeout: float = 30.0,
    ) -> None:
        require_redis_server()
        self.startup_timeout = startup_timeout
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
                    }
                ),
            )
            for _ in range(masters)
        ]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every master, for `RedisCluster(startup_nodes=...)` of any client library."""
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
                [REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
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
        """Poll CLUSTER INFO on every node until each says cluster_state:ok (e.g. after a restart)."""
        for node in self.nodes:
            _poll_until(
                lambda node=node: _cluster_state(node) == "ok",
                self.startup_timeout if timeout is None else timeout,
                f"cluster_state:ok on port {node.port}",
            )

    def stop(self) -> None:
        """Stop every node gracefully (their dirs are kept: `start()` on a node brings it back)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes:
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
