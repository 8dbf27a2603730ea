"""The native cluster: runs docker-compose.yml's services as local processes (`make run`).

docker-compose.yml is the one definition of the cluster. Natively each service runs the same
command with the same settings; the only rewrites are those a single host needs:
- a service's hostname (`redis:6379`, or `redis` followed by a port as its own argument) and
  `0.0.0.0` (with a port or alone) become 127.0.0.1 (nothing listens beyond loopback);
- ports can be remapped as a whole (`port_map`, used by tests to run beside a `make run`), or
  shifted by `--port-offset N` (env IPAM_DEV_PORT_OFFSET) to run a second cluster beside the first;
- replica i of a service gets metrics port + 10 i (containers each have their own 9100), and
  IPAM_REPLICA=i+1 so that it names itself in its log (a container's name is its hostname);
- volumes become folders under var/ (a path under a volume's mount point moves with it), and
  Python entry points come from the virtualenv.
Start order follows `depends_on` conditions, readiness the services' own health checks.
Services of a profile run only with it (`--profile NAME`, or COMPOSE_PROFILES, as compose); a
dependency with `required: false` on a service left out is dropped. A command's `$$` is compose's
literal `$`.

Lifecycle: a start whose ports are taken is refused (with the PID holding the port); SIGINT,
SIGTERM, SIGHUP and a closed stdout stop every service (each in its own process group, and told
to stop if this process dies); a replica whose compose `restart` policy asks for it is restarted
with backoff (compose's: doubling, up to 30 s, reset after 10 s up), logged; the exit code is 0
only for a stop that was asked for.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
_HOST_PORT = re.compile(r"\b([A-Za-z][A-Za-z0-9_-]*|0\.0\.0\.0|127\.0\.0\.1):(\d+)\b")
_PORT_FLAGS = ("--port", "-p")


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return env


@dataclass
class NativeService:
    """One compose service as the native cluster runs it."""

    name: str
    command: list[str]
    env: dict[str, str]
    replicas: int = 1
    health: list[str] | None = None
    health_interval: float = 1.0
    health_retries: int = 30
    one_shot: bool = False
    depends_on: dict[str, str] = field(default_factory=dict)
    replica_env: list[dict[str, str]] = field(default_factory=list)
    listens: list[str] = field(default_factory=list)  # what the service serves, for the start-up summary
    ports: list[int] = field(default_factory=list)  # every loopback port its replicas bind
    restart: bool = False  # compose's restart: always or unless-stopped


class Rewriter:
    """Applies the single-host rewrites to one string."""

    def __init__(self, services: set[str], port_map: Mapping[int, int], port_offset: int = 0) -> None:
        self.services = services
        self.port_map = dict(port_map)
        self.port_offset = port_offset

    def port(self, value: int) -> int:
        return self.port_map.get(value, value + self.port_offset)

    def text(self, value: str) -> str:
        def host_port(match: re.Match[str]) -> str:
            host, port = match.group(1), int(match.group(2))
            if host in self.services or host in ("0.0.0.0", "127.0.0.1", "localhost"):
                return f"127.0.0.1:{self.port(port)}"
            return match.group(0)

        return _HOST_PORT.sub(host_port, value)

    def argv(self, argv: list[str]) -> list[str]:
        out: list[str] = []
        for index, arg in enumerate(argv):
            arg = str(arg)
            before = str(argv[index - 1]) if index > 0 else ""
            after = str(argv[index + 1]) if index + 1 < len(argv) else ""
            if arg.isdigit() and (before in _PORT_FLAGS or before in self.services):
                arg = str(self.port(int(arg)))
            if arg == "0.0.0.0":  # a bind-address flag (`-H 0.0.0.0`): loopback only
                arg = "127.0.0.1"
            if arg in self.services and after.isdigit():  # `--replicaof redis 6379`
                arg = "127.0.0.1"
            out.append(self.text(arg))
        return out


def _bin(command: str) -> str:
    """Python entry points come from the running interpreter's environment."""
    if command in ("python", "python3"):
        return sys.executable
    local = Path(sys.executable).parent / command
    return str(local) if local.exists() else command


def _seconds(value: str | int | float | None, default: float) -> float:
    if value is None:
        return default
    text = str(value)
    return float(text[:-1]) if text.endswith("s") else float(text)


def native_services(
    compose: dict[str, Any],
    *,
    env_file: Path,
    data_dir: Path,
    port_map: Mapping[int, int] | None = None,
    port_offset: int = 0,
    profiles: Collection[str] = (),
) -> list[NativeService]:
    """The compose services of no profile or one of `profiles`, rewritten for one host, in start order."""
    services: dict[str, Any] = compose["services"]
    rewrite = Rewriter(set(services), port_map or {}, port_offset)
    variables = {**read_env_file(env_file), **os.environ}  # what compose interpolates ${VAR} from
    active = {name for name, spec in services.items() if _active(spec, profiles)}
    result: list[NativeService] = []
    for name, spec in services.items():
        if name not in active:
            continue  # opt-in services (the load profile) run by their own command (`make load`)
        env = read_env_file_list(spec.get("env_file"), env_file)  # only services that list it get .env
        mounts = _mounts(spec, data_dir / name)
        env.update(
            {
                k: _moved(rewrite.text(interpolate(str(v), variables)), mounts)
                for k, v in (spec.get("environment") or {}).items()
            }
        )
        command = [_moved(arg.replace("$$", "$"), mounts) for arg in rewrite.argv(list(spec.get("command") or []))]
        if str(spec.get("image", "")).startswith("redis"):
            (data_dir / name).mkdir(parents=True, exist_ok=True)
            command += ["--dir", str(data_dir / name), "--bind", "127.0.0.1"]
        command[0] = _bin(command[0])
        health = spec.get("healthcheck", {}).get("test")
        if health:
            health = rewrite.argv(health[1:] if health[0] in ("CMD", "CMD-SHELL") else health)
            health[0] = _bin(health[0])
        depends = (
            {
                dep: (cond or {}).get("condition", "service_started")
                for dep, cond in (spec.get("depends_on") or {}).items()
                if dep in active or (cond or {}).get("required", True)
            }
            if isinstance(spec.get("depends_on"), dict)
            else {dep: "service_started" for dep in spec.get("depends_on") or []}
        )
        replicas = int((spec.get("deploy") or {}).get("replicas", 1))
        service = NativeService(
            name=name,
            command=command,
            env=env,
            replicas=replicas,
            health=health or None,
            health_interval=_seconds(spec.get("healthcheck", {}).get("interval"), 1.0),
            health_retries=int(spec.get("healthcheck", {}).get("retries", 30)),
            one_shot=str(spec.get("restart", "")) == "no",
            depends_on=depends,
            restart=str(spec.get("restart", "")) in ("always", "unless-stopped"),
        )
        service.replica_env = [_replica_env(env, index, replicas) for index in range(replicas)]
        service.listens = _listens(spec, rewrite)
        service.ports = _ports(spec, rewrite, service.replica_env)
        result.append(service)
    return _start_order(result)


def _active(spec: dict[str, Any], profiles: Collection[str]) -> bool:
    """compose's rule: a service without profiles always runs, one with profiles when one is on."""
    return not spec.get("profiles") or bool(set(spec["profiles"]) & set(profiles))


def profiles_from_env() -> list[str]:
    """COMPOSE_PROFILES, as compose reads it (comma-separated)."""
    return [p.strip() for p in os.environ.get("COMPOSE_PROFILES", "").split(",") if p.strip()]


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """compose's `${VAR}` and `${VAR:-default}` (an unset or empty VAR takes the default)."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value)


def read_env_file_list(entries: Any, default: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries or []:
        path = default if Path(entry).name == ".env" else ROOT / entry
        env.update(read_env_file(path))
    return env


def _listens(spec: dict[str, Any], rewrite: Rewriter) -> list[str]:
    """Addresses a service binds: compose's 0.0.0.0 settings and the command's port flag."""
    out = [
        f"{key.removeprefix('IPAM_').removesuffix('_ADDRESS').lower()} {rewrite.text(str(value))}"
        for key, value in (spec.get("environment") or {}).items()
        if str(value).startswith("0.0.0.0:")
    ]
    command = [str(c) for c in spec.get("command") or []]
    for flag in _PORT_FLAGS:
        if flag in command:
            out.append(f"port 127.0.0.1:{rewrite.port(int(command[command.index(flag) + 1]))}")
    return out


def _mounts(spec: dict[str, Any], folder: Path) -> dict[str, Path]:
    """A service's volume mount points (`name:/data`) and the folder each becomes natively."""
    out: dict[str, Path] = {}
    for volume in spec.get("volumes") or []:
        source, _, target = str(volume).partition(":")
        if target and not source.startswith((".", "/")):  # named volumes; bind mounts stay as they are
            out[target.split(":")[0].rstrip("/")] = folder
    return out


def _moved(value: str, mounts: Mapping[str, Path]) -> str:
    """A path under a volume's mount point, moved to the volume's native folder."""
    for target, folder in mounts.items():
        if value == target or value.startswith(target + "/"):
            return str(folder) + value[len(target) :]
    return value


def _ports(spec: dict[str, Any], rewrite: Rewriter, replica_env: list[dict[str, str]]) -> list[int]:
    """Every port the service's replicas bind natively: its 0.0.0.0 settings and its port flag."""
    ports: list[int] = []
    for key, value in (spec.get("environment") or {}).items():
        if str(value).startswith("0.0.0.0:"):
            ports += [int(env[key].rpartition(":")[2]) for env in replica_env]
    command = [str(c) for c in spec.get("command") or []]
    for flag in _PORT_FLAGS:
        if flag in command:
            ports.append(rewrite.port(int(command[command.index(flag) + 1])))
    return sorted(set(ports))


def _replica_env(env: dict[str, str], index: int, replicas: int = 1) -> dict[str, str]:
    out = dict(env)
    if replicas > 1:
        out["IPAM_REPLICA"] = str(index + 1)  # compose's container names count from 1 too
    metrics = out.get("IPAM_METRICS_ADDRESS")
    if metrics and index:
        host, _, port = metrics.rpartition(":")
        # A --workers N process takes ports port..port+N-1; keep replicas apart by ten.
        out["IPAM_METRICS_ADDRESS"] = f"{host}:{int(port) + 10 * index}"
    return out


def _start_order(services: list[NativeService]) -> list[NativeService]:
    by_name = {s.name: s for s in services}
    ordered: list[NativeService] = []
    seen: set[str] = set()

    def visit(service: NativeService) -> None:
        if service.name in seen:
            return
        seen.add(service.name)
        for dep in service.depends_on:
            if dep in by_name:
                visit(by_name[dep])
        ordered.append(service)

    for service in services:
        visit(service)
    return ordered


_PR_SET_PDEATHSIG = 1


def _own_group_and_die_with_parent() -> None:
    """In the child before exec: its own process group (a terminal's Ctrl-C reaches us, not it),
    and SIGTERM when the devcluster process dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl: do not outlive it
        os._exit(1)


def port_holder(port: int) -> str:
    """`pid N (name)` of the process listening on a TCP port, from /proc; "" when not found (not ours)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    name = (proc / "comm").read_text().strip()
                    return f"pid {proc.name} ({name})"
        except OSError:
            continue
    return ""


def port_taken(port: int) -> bool:
    """Whether binding 127.0.0.1:port fails (a listener elsewhere, SO_REUSEPORT ones included)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class StartRefused(RuntimeError):
    """The cluster cannot start (ports taken, a service that fails): exit code 1."""


class Interrupted(Exception):
    """A signal asked to stop while the cluster was starting."""


# compose's restart backoff: doubling from a short first delay, capped; reset after a while up.
RESTART_FIRST_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
RESTART_RESET_AFTER = 10.0


@dataclass
class _Replica:
    service: NativeService
    index: int
    process: subprocess.Popen[bytes]
    started: float
    restarts: int = 0
    delay: float = RESTART_FIRST_DELAY
    restart_at: float | None = None  # when it exited and waits for its restart

    @property
    def name(self) -> str:
        return f"{self.service.name} {self.index + 1}" if self.service.replicas > 1 else self.service.name


class NativeCluster:
    """Starts, watches and stops the native services."""

    def __init__(
        self,
        services: list[NativeService],
        log_dir: Path,
        *,
        extra_env: Mapping[str, str] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.services = services
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {}
        self._replicas: dict[str, list[_Replica]] = {}
        self.say = say
        log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, service: NativeService, index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, **service.replica_env[index], **self.extra_env}
        with (self.log_dir / f"{service.name}-{index + 1}.log").open("ab") as log:
            return subprocess.Popen(
                service.command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                preexec_fn=_own_group_and_die_with_parent,
            )

    def check_ports(self) -> None:
        """Refuses to start when a port the cluster needs is taken, naming it and its holder."""
        taken = []
        for service in self.services:
            for port in service.ports:
                if port_taken(port):
                    holder = port_holder(port) or "another user's process"
                    taken.append(f"port {port} ({service.name}) is taken by {holder}")
        if taken:
            raise StartRefused("; ".join(taken) + "; is another `make run` running?")

    def healthy(self, service: NativeService) -> bool:
        if service.health is None:
            return all(p.poll() is None for p in self.processes.get(service.name, []))
        env = {**os.environ, **service.env, **self.extra_env}
        return (
            subprocess.run(
                service.health, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30
            ).returncode
            == 0
        )

    def start(self) -> None:
        self.check_ports()
        for service in self.services:
            for dep, condition in service.depends_on.items():
                self._wait_for(self._service(dep), condition)
            now = time.monotonic()
            self._replicas[service.name] = [
                _Replica(service, i, self._spawn(service, i), now) for i in range(service.replicas)
            ]
            self.processes[service.name] = [r.process for r in self._replicas[service.name]]
            if service.one_shot:
                self._wait_for(service, "service_completed_successfully")

    def _service(self, name: str) -> NativeService:
        return next(s for s in self.services if s.name == name)

    def _wait_for(self, service: NativeService, condition: str) -> None:
        processes = self.processes[service.name]
        if condition == "service_completed_successfully":
            for process in processes:
                if process.wait(timeout=600) != 0:
                    raise StartRefused(f"{service.name} failed (exit {process.returncode}); see {self.log_dir}")
            return
        if condition != "service_healthy":
            return
        for _ in range(max(service.health_retries, 1) * 2):
            if any(p.poll() is not None for p in processes) and not service.one_shot:
                raise StartRefused(f"{service.name} exited; see {self.log_dir}/{service.name}-1.log")
            if self.healthy(service):
                return
            time.sleep(service.health_interval / 2)
        raise StartRefused(f"{service.name} is not healthy; see {self.log_dir}/{service.name}-1.log")

    def replicas(self, name: str) -> list[subprocess.Popen[bytes]]:
        return self.processes[name]

    def watch(self) -> str | None:
        """One look at every long-running replica: restarts those due (their policy asks for it);
        returns why the cluster must stop (a replica without a restart policy ended), else None."""
        now = time.monotonic()
        for service in self.services:
            if service.one_shot:
                continue
            for replica in self._replicas.get(service.name, []):
                if replica.restart_at is None:
                    code = replica.process.poll()
                    if code is None:
                        continue
                    if not service.restart:
                        return f"{replica.name} exited with {code}; see {self.log_dir}"
                    if now - replica.started >= RESTART_RESET_AFTER:
                        replica.delay = RESTART_FIRST_DELAY
                    replica.restart_at = now + replica.delay
                    self.say(
                        f"{replica.name} (pid {replica.process.pid}) exited with {code}:"
                        f" restarting in {replica.delay:g} s"
                    )
                    replica.delay = min(replica.delay * 2, RESTART_MAX_DELAY)
                elif now >= replica.restart_at:
                    replica.process = self._spawn(service, replica.index)
                    replica.started, replica.restart_at = now, None
                    replica.restarts += 1
                    self.processes[service.name][replica.index] = replica.process
                    self.say(f"{replica.name} restarted (pid {replica.process.pid}, restart {replica.restarts})")
        return None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process group, newest service first; SIGKILL what is left after `timeout`."""
        for service in reversed(self.services):
            processes = self.processes.get(service.name, [])
            for process in processes:
                if process.poll() is None:
                    _signal_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in processes:
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
                _signal_group(process.pid, signal.SIGKILL)  # what the leader left behind in its group

    def listening(self) -> Iterator[str]:
        for service in self.services:
            if service.one_shot:
                continue
            pids = ",".join(str(p.pid) for p in self.processes.get(service.name, []))
            extra = " (metrics port +10 per replica)" if service.replicas > 1 else ""
            yield f"  {service.name:<10} x{service.replicas}  {', '.join(service.listens)}{extra}  pid {pids}"


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Output:
    """Our messages on stdout, which may break (`make run | tee log` and Ctrl-C kill tee first):
    a write to a closed stdout is dropped instead of raising, and `broken` says so, as does a
    pipe whose reader went away before we wrote."""

    def __init__(self) -> None:
        self.broken = False

    def __call__(self, text: str) -> None:
        if self.broken:
            return
        try:
            print(text, flush=True)
        except (BrokenPipeError, ValueError, OSError):
            self._lost()

    def _lost(self) -> None:
        self.broken = True
        try:  # later writes, Python's own flush at exit included, go nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass

    def check(self) -> bool:
        """True when stdout is a pipe without a reader (or a hung-up terminal)."""
        if not self.broken:
            try:
                poller = select.poll()
                poller.register(sys.stdout.fileno(), 0)  # only errors and hang-ups are reported
                if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                    self._lost()
            except (OSError, ValueError):
                pass
        return self.broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compose-file", type=Path, default=COMPOSE_FILE, help="the cluster's definition")
    parser.add_argument("--var", type=Path, default=ROOT / "var", help="data and logs (default var/)")
    parser.add_argument(
        "--env-file", type=Path, default=ROOT / ".env", help="settings and tokens (default .env, from .env.example)"
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=int(os.environ.get("IPAM_DEV_PORT_OFFSET", "0")),
        help="added to every port, to run beside another cluster (env IPAM_DEV_PORT_OFFSET; default 0)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        default=profiles_from_env(),
        help="also run the services of this compose profile (repeatable; env COMPOSE_PROFILES), e.g. ha",
    )
    args = parser.parse_args(argv)
    say = Output()
    env_file: Path = args.env_file
    if not env_file.exists():
        shutil.copy(ROOT / ".env.example", env_file)
        say(f"wrote {env_file} from .env.example: change its tokens for anything but a demo")
    services = native_services(
        load_compose(args.compose_file),
        env_file=env_file,
        data_dir=args.var / "data",
        port_offset=args.port_offset,
        profiles=args.profile,
    )
    cluster = NativeCluster(services, args.var / "log", say=say)
    state: dict[str, Any] = {"stop": None, "starting": True}

    def on_signal(signum: int, _frame: object) -> None:
        state["stop"] = state["stop"] or f"{signal.Signals(signum).name}"
        if state["starting"]:
            state["starting"] = False
            raise Interrupted(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    failure: str | None = None
    try:
        cluster.start()
        state["starting"] = False
        say("ipam is running (Ctrl-C stops it):")
        for line in cluster.listening():
            say(line)
        for line in _hints(services, env_file, args.var):
            say(line)
        while state["stop"] is None and failure is None:
            failure = cluster.watch()
            if say.check():
                state["stop"] = "stdout closed"
            time.sleep(0.2)
    except Interrupted:
        pass
    except StartRefused as exc:
        failure = str(exc)
    finally:
        state["starting"] = False
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)  # a second Ctrl-C does not cut the stop short
        if failure:
            print(f"devcluster: {failure}", file=sys.stderr, flush=True)
        say(f"stopping ({state['stop'] or 'after a failure'}) ...")
        cluster.stop()
        say("stopped")
    return 1 if failure else 0


def _hints(services: list[NativeService], env_file: Path, var: Path) -> Iterator[str]:
    """What to do next, and what the demo keeps across restarts."""
    address = next((s.env["IPAM_GRPC_ADDRESS"] for s in services if s.name == "allocator"), "127.0.0.1:50051")
    yield f"  logs in {var / 'log'}"
    yield (
        f"  ipamctl's token: export IPAM_TOKEN=$(sed -n 's/^IPAM_ADMIN_TOKENS=//p' {env_file} | cut -d, -f1)"
        "  (or token = ... in ~/.config/ipam/config)"
    )
    yield f"  then: .venv/bin/ipamctl --address {address} status"
    if any("dev.local_ec2" in s.command for s in services):
        yield (
            f"  state: Redis and the local EC2 keep theirs in {var / 'data'} across restarts"
            f" (the EC2 by replaying its recorded requests); rm -r {var} starts afresh"
        )
    else:
        yield "  state: the local EC2 keeps NOTHING across restarts: the demo's nodes are registered anew each time"


if __name__ == "__main__":
    sys.exit(main())
