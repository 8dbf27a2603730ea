"""Runs the real `ipam-cloudworker` as a subprocess for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .allocator_process import ADMIN_TOKEN
from .moto_server import DUMMY_KEY, REGION
from .redis_server import free_port


class WorkerProcess:
    """`python -m services.cloudworker` against a Redis, an allocator and the moto server."""

    def __init__(self, redis_url: str, allocator_address: str, ec2_endpoint_url: str, **settings: object) -> None:
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "IPAM_REDIS_URL": redis_url,
            "IPAM_GRPC_ADDRESS": allocator_address,
            "IPAM_ADMIN_TOKEN": ADMIN_TOKEN,
            "IPAM_EC2_ENDPOINT_URL": ec2_endpoint_url,
            "IPAM_AWS_REGION": REGION,
            "IPAM_AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "IPAM_AWS_SECRET_ACCESS_KEY": DUMMY_KEY,
            "IPAM_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
            "IPAM_EC2_QPS": "100",
            "IPAM_EC2_BURST": "100",
            "IPAM_CLAIM_IDLE_SECONDS": "2",
            "IPAM_NODE_LOCK_SECONDS": "5",
            "IPAM_RESYNC_INTERVAL_SECONDS": "3600",
            "IPAM_LOG_LEVEL": "INFO",
        }
        for key, value in settings.items():
            self.env[f"IPAM_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        self._log = Path(tempfile.mkstemp(prefix="ipam-worker-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cloudworker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def log_text(self) -> str:
        return self._log.read_text(errors="replace")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
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

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
