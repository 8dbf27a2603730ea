"""Runs the real `ipam-allocator` as a subprocess for tests (a real gRPC server on a socket)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .redis_server import free_port

ADMIN_TOKEN = "test-admin-token"
CLIENT_TOKEN = "test-client-token"


class AllocatorProcess:
    """`python -m services.allocator` with settings from `IPAM_*` variables."""

    def __init__(
        self,
        redis_url: str,
        *,
        cluster: bool = False,
        workers: int = 1,
        port: int | None = None,
        health_credentials: grpc.ChannelCredentials | None = None,
        **settings: object,
    ) -> None:
        """`health_credentials`: how to reach a TLS server's health service."""
        self.health_credentials = health_credentials
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "IPAM_REDIS_URL": redis_url,
            "IPAM_REDIS_CLUSTER": "true" if cluster else "false",
            "IPAM_GRPC_ADDRESS": self.address,
            "IPAM_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
            "IPAM_WORKERS": str(workers),
            "IPAM_ADMIN_TOKENS": ADMIN_TOKEN,
            "IPAM_CLIENT_TOKENS": CLIENT_TOKEN,
            "IPAM_REUSE_COOLDOWN_SECONDS": "0",
            "IPAM_TIMER_SWEEP_SECONDS": "0.1",
            "IPAM_SHUTDOWN_GRACE_SECONDS": "5",
        }
        for key, value in settings.items():
            self.env[f"IPAM_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        self._log = Path(tempfile.mkstemp(prefix="ipam-allocator-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> AllocatorProcess:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.allocator"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Polls the health service until it says SERVING."""
        deadline = time.monotonic() + timeout
        channel = (
            grpc.secure_channel(self.address, self.health_credentials)
            if self.health_credentials
            else grpc.insecure_channel(self.address)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"allocator exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"allocator on {self.address} not serving after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group (every worker process)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.process.returncode if self.process else None
        if code == 0:
            self._log.unlink(missing_ok=True)
        return code

    def __enter__(self) -> AllocatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
