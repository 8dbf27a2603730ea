"""One of our services as a real subprocess, configured the way operators do: `IPAM_*` variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Self


class ServiceProcess:
    """`python -m <module>` in its own process group, its output in a log file."""

    module = ""

    def __init__(self, defaults: dict[str, str], settings: dict[str, object]) -> None:
        self.env = {**os.environ, **defaults}
        for key, value in settings.items():
            self.env[f"IPAM_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        name = self.module.rpartition(".")[2]
        self._log = Path(tempfile.mkstemp(prefix=f"ipam-{name}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self) -> Self:
        self.spawn()
        return self

    def log_text(self) -> str:
        return self._log.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group (every process of `--workers`)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code. The log of a clean exit is removed."""
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
