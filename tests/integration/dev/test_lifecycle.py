"""`make run`'s lifecycle with real processes: signals and a closed stdout stop every service
(process groups, nothing left with PPID 1), taken ports refuse the start, a killed replica is
restarted, and the exit code says whether the cluster stopped because something failed.

The cluster here is a small compose file (Redis and a two-replica stand-in service on free ports)
run by `python -m dev.devcluster` itself, so each test costs about a second.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dev.devcluster import ROOT
from tests.support.polling import poll
from tests.support.redis_server import free_port


def _compose(redis_port: int, web_port: int, *, seed_exit: int = 0) -> dict:  # type: ignore[type-arg]
    return {
        "services": {
            "redis": {
                "image": "redis:7.2",
                "command": ["redis-server", "--port", str(redis_port), "--save", ""],
                "healthcheck": {"test": ["CMD", "redis-cli", "-p", str(redis_port), "ping"], "interval": "0.2s"},
            },
            "web": {
                "image": "ipam:dev",
                "restart": "unless-stopped",
                "command": ["python", "-m", "tests.support.listener"],
                "environment": {"IPAM_METRICS_ADDRESS": f"0.0.0.0:{web_port}"},
                "deploy": {"replicas": 2},
                "depends_on": {"redis": {"condition": "service_healthy"}},
                "healthcheck": {
                    "test": ["CMD", "python", "-m", "services.healthcheck", "--http", f"http://127.0.0.1:{web_port}/"],
                    "interval": "0.2s",
                },
            },
            "seed": {
                "image": "ipam:dev",
                "restart": "no",
                "command": ["python", "-c", f"import sys; sys.exit({seed_exit})"],
                "depends_on": {"web": {"condition": "service_healthy"}},
            },
        }
    }


@dataclass
class Run:
    """One `python -m dev.devcluster` with its output read line by line."""

    process: subprocess.Popen[str]
    var: Path
    web_port: int
    redis_port: int
    lines: list[str] = field(default_factory=list)
    only_summary: bool = False  # stop reading after the start-up summary (the test closes the pipe)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.only_summary and line.startswith("  state:"):
                return

    def text(self) -> str:
        return "\n".join(self.lines)

    def pids(self, service: str) -> list[int]:
        """From the start-up summary: `  web  x2  ...  pid 1,2`."""
        line = next(line for line in self.lines if line.startswith(f"  {service} "))
        return [int(p) for p in line.rpartition("pid ")[2].split(",")]

    def every_pid(self) -> list[int]:
        """Each service's processes and the children they started in their groups."""
        children = [
            int(m)
            for log in (self.var / "log").glob("web-*.log")
            for m in re.findall(r"^child (\d+)$", log.read_text(), re.M)
        ]
        return [*self.pids("redis"), *self.pids("web"), *children]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path, *, seed_exit: int = 0, wait: bool = True, only_summary: bool = False) -> Run:
    redis_port, web_port = free_port(), free_port()
    while web_port + 10 == redis_port or web_port == redis_port:
        web_port = free_port()
    compose = tmp_path / "compose.yml"
    compose.write_text(yaml.safe_dump(_compose(redis_port, web_port, seed_exit=seed_exit)))
    env_file = tmp_path / ".env"
    env_file.write_text("IPAM_LOG_LEVEL=INFO\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dev.devcluster",
            "--compose-file",
            str(compose),
            "--var",
            str(tmp_path / "var"),
            "--env-file",
            str(env_file),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run = Run(process, tmp_path / "var", web_port, redis_port, only_summary=only_summary)
    reader = threading.Thread(target=run.read, daemon=True)
    reader.start()
    if wait:
        poll(lambda: "ipam is running" in run.text() and run.lines[-1].startswith("  state:"), timeout=30)
    if only_summary:
        reader.join(timeout=5)
    return run


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:  # a failed test must not leave a cluster behind either
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
        return reply.read().decode()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_every_service_and_exits_0(tmp_path: Path, runs: list[Run], signum: int) -> None:
    run = _start(tmp_path)
    runs.append(run)
    pids = run.every_pid()
    assert len(pids) == 5 and all(_alive(pid) for pid in pids)
    run.process.send_signal(signum)
    assert run.process.wait(timeout=30) == 0
    assert not [pid for pid in pids if _alive(pid)]


@pytest.mark.parametrize("with_sigint", [False, True], ids=["stdout-closed", "stdout-closed-and-sigint"])
def test_a_closed_stdout_stops_every_service(tmp_path: Path, runs: list[Run], with_sigint: bool) -> None:
    """`make run | tee log` and Ctrl-C: tee dies first, and devcluster's next print fails."""
    run = _start(tmp_path, only_summary=True)
    runs.append(run)
    pids = run.every_pid()
    assert run.process.stdout is not None
    os.close(run.process.stdout.fileno())
    if with_sigint:
        run.process.send_signal(signal.SIGINT)
    assert run.process.wait(timeout=30) == 0
    assert "Traceback" not in run.process.stderr.read()  # type: ignore[union-attr]
    assert not [pid for pid in pids if _alive(pid)]


def test_a_start_on_taken_ports_is_refused_naming_the_port_and_its_holder(tmp_path: Path, runs: list[Run]) -> None:
    run = _start(tmp_path, wait=False)
    runs.append(run)
    # Hold the second replica's port before devcluster checks it: start a fresh run on known ports.
    run.process.kill()
    run.process.wait()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    web_port = holder.getsockname()[1] - 10
    compose = tmp_path / "taken.yml"
    compose.write_text(yaml.safe_dump(_compose(free_port(), web_port)))
    with holder:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dev.devcluster",
                "--compose-file",
                str(compose),
                "--var",
                str(tmp_path / "var2"),
                "--env-file",
                str(tmp_path / ".env"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {web_port + 10} (web) is taken by pid {os.getpid()}" in result.stderr
    assert "is another `make run` running?" in result.stderr
    assert "ipam is running" not in result.stdout
    assert not list((tmp_path / "var2" / "log").glob("*.log"))  # nothing was started


def test_a_killed_replica_is_restarted_and_logged(tmp_path: Path, runs: list[Run]) -> None:
    run = _start(tmp_path)
    runs.append(run)
    first, second = run.pids("web")
    assert _get(run.web_port + 10) == f"replica 2 pid {second}\n"
    os.kill(second, signal.SIGKILL)
    poll(lambda: re.search(r"^web 2 restarted \(pid (\d+), restart 1\)$", run.text(), re.M), timeout=20)
    assert f"web 2 (pid {second}) exited with -9: restarting in 0.5 s" in run.text()
    new_pid = int(re.search(r"^web 2 restarted \(pid (\d+)", run.text(), re.M).group(1))  # type: ignore[union-attr]
    assert poll(lambda: _safe_get(run.web_port + 10)) == f"replica 2 pid {new_pid}\n"
    assert _alive(first) and run.process.poll() is None  # the rest kept running
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(timeout=30) == 0
    assert not _alive(new_pid)


def _safe_get(port: int) -> str:
    try:
        return _get(port)
    except OSError:
        return ""


def test_a_service_without_restart_policy_ending_stops_the_cluster_with_exit_1(tmp_path: Path, runs: list[Run]) -> None:
    run = _start(tmp_path)
    runs.append(run)
    pids = run.every_pid()
    os.kill(run.pids("redis")[0], signal.SIGKILL)
    assert run.process.wait(timeout=30) == 1
    assert "redis exited with -9" in run.process.stderr.read()  # type: ignore[union-attr]
    assert not [pid for pid in pids if _alive(pid)]


def test_a_failed_start_stops_what_started_with_exit_1(tmp_path: Path, runs: list[Run]) -> None:
    run = _start(tmp_path, seed_exit=3, wait=False)
    runs.append(run)
    assert run.process.wait(timeout=30) == 1
    assert "seed failed (exit 3)" in run.process.stderr.read()  # type: ignore[union-attr]
    poll(lambda: "stopped" in run.lines, timeout=5)
    logs = list((run.var / "log").glob("web-*.log"))
    children = [int(m) for log in logs for m in re.findall(r"^child (\d+)$", log.read_text(), re.M)]
    assert len(children) == 2 and not [pid for pid in children if _alive(pid)]


def test_services_do_not_outlive_a_killed_devcluster(tmp_path: Path, runs: list[Run]) -> None:
    """Even kill -9, which no handler sees: each service is told to stop when its parent dies."""
    run = _start(tmp_path)
    runs.append(run)
    pids = run.every_pid()
    run.process.kill()
    run.process.wait()
    poll(lambda: not [pid for pid in pids if _alive(pid)], timeout=15)
