"""The native cluster: runs docker-compose.yml's services as local processes (`make run`).

docker-compose.yml is the one definition of the cluster. Natively each service runs the same
command with the same settings; the only rewrites are those a single host needs:
- a service's hostname (`redis:6379`) and `0.0.0.0` become 127.0.0.1 (nothing listens beyond loopback);
- ports can be remapped as a whole (`port_map`, used by tests to run beside a `make run`);
- replica i of a service gets metrics port + i (containers each have their own 9100);
- volumes become folders under var/ and Python entry points come from the virtualenv.
Start order follows `depends_on` conditions, readiness the services' own health checks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
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


class Rewriter:
    """Applies the single-host rewrites to one string."""

    def __init__(self, services: set[str], port_map: Mapping[int, int]) -> None:
        self.services = services
        self.port_map = dict(port_map)

    def port(self, value: int) -> int:
        return self.port_map.get(value, value)

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
            if index > 0 and argv[index - 1] in _PORT_FLAGS and arg.isdigit():
                arg = str(self.port(int(arg)))
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
    compose: dict[str, Any], *, env_file: Path, data_dir: Path, port_map: Mapping[int, int] | None = None
) -> list[NativeService]:
    """The compose services, rewritten for one host, in start order."""
    services: dict[str, Any] = compose["services"]
    rewrite = Rewriter(set(services), port_map or {})
    base_env = read_env_file(env_file)
    result: list[NativeService] = []
    for name, spec in services.items():
        if spec.get("profiles"):
            continue  # opt-in services (the load profile) run by their own command (`make load`)
        env = {**base_env, **read_env_file_list(spec.get("env_file"), env_file)}
        env.update({k: rewrite.text(str(v)) for k, v in (spec.get("environment") or {}).items()})
        command = rewrite.argv(list(spec.get("command") or []))
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
        )
        service.replica_env = [_replica_env(env, index) for index in range(replicas)]
        service.listens = _listens(spec, rewrite)
        result.append(service)
    return _start_order(result)


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


def _replica_env(env: dict[str, str], index: int) -> dict[str, str]:
    out = dict(env)
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


class NativeCluster:
    """Starts, watches and stops the native services."""

    def __init__(
        self, services: list[NativeService], log_dir: Path, *, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.services = services
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, service: NativeService, index: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, **service.replica_env[index], **self.extra_env}
        log = (self.log_dir / f"{service.name}-{index + 1}.log").open("ab")
        return subprocess.Popen(
            service.command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )

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
        for service in self.services:
            for dep, condition in service.depends_on.items():
                self._wait_for(self._service(dep), condition)
            self.processes[service.name] = [self._spawn(service, i) for i in range(service.replicas)]
            if service.one_shot:
                self._wait_for(service, "service_completed_successfully")

    def _service(self, name: str) -> NativeService:
        return next(s for s in self.services if s.name == name)

    def _wait_for(self, service: NativeService, condition: str) -> None:
        processes = self.processes[service.name]
        if condition == "service_completed_successfully":
            for process in processes:
                if process.wait(timeout=600) != 0:
                    raise RuntimeError(f"{service.name} failed (exit {process.returncode}); see {self.log_dir}")
            return
        if condition != "service_healthy":
            return
        for _ in range(max(service.health_retries, 1) * 2):
            if any(p.poll() is not None for p in processes) and not service.one_shot:
                raise RuntimeError(f"{service.name} exited; see {self.log_dir}/{service.name}-1.log")
            if self.healthy(service):
                return
            time.sleep(service.health_interval / 2)
        raise RuntimeError(f"{service.name} is not healthy; see {self.log_dir}/{service.name}-1.log")

    def replicas(self, name: str) -> list[subprocess.Popen[bytes]]:
        return self.processes[name]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process, newest service first; SIGKILL what is left after `timeout`."""
        for service in reversed(self.services):
            for process in self.processes.get(service.name, []):
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in self.processes.get(service.name, []):
                try:
                    process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

    def listening(self) -> Iterator[str]:
        for service in self.services:
            if service.one_shot:
                continue
            pids = ",".join(str(p.pid) for p in self.processes.get(service.name, []))
            extra = " (metrics port +10 per replica)" if service.replicas > 1 else ""
            yield f"  {service.name:<10} x{service.replicas}  {', '.join(service.listens)}{extra}  pid {pids}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    parser.add_argument("--var", type=Path, default=ROOT / "var", help="data and logs")
    args = parser.parse_args(argv)
    env_file = ROOT / ".env"
    if not env_file.exists():
        shutil.copy(ROOT / ".env.example", env_file)
        print(f"wrote {env_file} from .env.example: change its tokens for anything but a demo")
    services = native_services(load_compose(args.compose_file), env_file=env_file, data_dir=args.var / "data")
    cluster = NativeCluster(services, args.var / "log")
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        print("ipam is running (Ctrl-C stops it):")
        for line in cluster.listening():
            print(line)
        print(f"  logs in {args.var / 'log'}; try: .venv/bin/ipamctl --token <IPAM_ADMIN_TOKEN from .env> nodes list")
        while not stop:
            for service in cluster.services:
                if service.one_shot:
                    continue
                for process in cluster.processes[service.name]:
                    if process.poll() is not None:
                        print(f"{service.name} exited with {process.returncode}; see {args.var / 'log'}")
                        stop = True
            time.sleep(0.5)
    except RuntimeError as exc:
        print(f"devcluster: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping ...")
        cluster.stop()
        print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
