"""The local EC2 for tests: a real moto server process over HTTP, and a demo network inside it.

    with MotoServer() as server:
        ec2 = ec2_client(server.endpoint_url)
        network = create_demo_network(ec2)

boto3 talks to it exactly as to AWS. Its quirks: no instance limits, no subnet
capacity, loose answers to some calls (DeleteOnTermination ignored, every address in an assign's answer) — hence the large /20 subnets here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import boto3
from botocore.awsrequest import AWSResponse
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from dev.demo_seed import (  # noqa: F401 - re-exported for the tests
    AVAILABILITY_ZONE,
    DEMO_IMAGE_ID,
    POD_SUBNET_TAGS,
    REGION,
    DemoNetwork,
    create_demo_network,
    run_instance,
)

ROOT = Path(__file__).resolve().parents[2]
DUMMY_KEY = "testing"  # moto accepts any credentials
# moto does not check image ids unless MOTO_ENABLE_AMI_VALIDATION is set (we unset it for our
# server); describing its catalogue of real images would cost a second.


class MotoServer:
    """`python -m moto.server` on a free loopback port, ready once its HTTP API answers.

    `local_ec2=True` runs the local EC2 instead (`python -m dev.local_ec2`: moto with the subnet
    address map and prefix delegation), with `args` added to its command line.
    """

    def __init__(
        self, host: str = "127.0.0.1", ready_timeout: float = 30.0, *, local_ec2: bool = False, args: Sequence[str] = ()
    ) -> None:
        self.host = host
        self.port = 0
        self.ready_timeout = ready_timeout
        self.module = "dev.local_ec2" if local_ec2 else "moto.server"
        self.args = list(args)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        """Where boto3 should send requests."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The process id of the running server (to SIGSTOP it)."""
        assert self._process is not None
        return self._process.pid

    def start(self) -> Self:
        """Start the server and wait until it answers; retries on a port taken in the meantime."""
        for _ in range(3):
            self.port = _free_port(self.host)
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
            self._process = subprocess.Popen(
                [sys.executable, "-m", self.module, "-H", self.host, "-p", str(self.port), *self.args],
                cwd=ROOT,
                stdout=self._log,
                env={**os.environ, "MOTO_ENABLE_AMI_VALIDATION": ""},
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError("moto server did not start three times in a row")

    def stop(self) -> None:
        """Kill the server: it has nothing to save (a local EC2 writes each request it records as it
        serves it), and moto.server's exit on SIGTERM spends seconds tearing down its modules."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def configure(self, **settings: str) -> None:
        """Change settings of a running local EC2 (`prefix_capacity_error=...`)."""
        request = urllib.request.Request(
            f"{self.endpoint_url}/local-ec2/settings", data=json.dumps(settings).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_ready(self) -> bool:
        """Poll the dashboard URL. False if the process died (port taken); raises on timeout."""
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)  # polling interval, not a synchronisation
        output = self._read_log()
        self.stop()
        raise RuntimeError(f"moto server not ready after {self.ready_timeout}s; output:\n{output}")

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")


def ec2_client(endpoint_url: str, region: str = REGION) -> BaseClient:
    """A boto3 EC2 client for the moto server, with dummy credentials and botocore retries off."""
    return boto3.session.Session().client(
        "ec2",
        region_name=region,
        endpoint_url=endpoint_url,
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_KEY,
        config=Config(retries={"total_max_attempts": 1}),
    )


class Ec2Fault:
    """Makes the next `times` calls of one EC2 operation fail with error `code`.

    A botocore `before-call` hook answers in the server's place, so botocore raises the same
    `ClientError` it would raise for a real EC2 error; later calls reach the server again.
    """

    def __init__(
        self,
        client: BaseClient,
        operation: str,
        code: str,
        *,
        times: int = 1,
        status: int = 400,
        message: str = "injected by the test",
    ) -> None:
        self.code = code
        self.message = message
        self.status = status
        self.remaining = times
        self.injected = 0
        client.meta.events.register(f"before-call.ec2.{operation}", self._answer)

    def _answer(self, **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        self.injected += 1
        parsed = {
            "Error": {"Code": self.code, "Message": self.message},
            "ResponseMetadata": {"HTTPStatusCode": self.status},
        }
        return AWSResponse(url="", status_code=self.status, headers={}, raw=None), parsed


class Ec2FaultAfterCall:
    """Lets the next `times` calls of one EC2 operation reach the server and be carried out, then
    makes their answer an error (EC2 did the work but answered 500, or the answer was lost)."""

    def __init__(
        self, client: BaseClient, operation: str, code: str = "InternalError", *, times: int = 1, status: int = 500
    ) -> None:
        self.operation = operation
        self.code = code
        self.status = status
        self.remaining = times
        self.injected = 0
        client.meta.events.register(f"after-call.ec2.{operation}", self._answer)

    def _answer(self, **_: Any) -> None:
        if self.remaining <= 0:
            return
        self.remaining -= 1
        self.injected += 1
        error = {
            "Error": {"Code": self.code, "Message": "carried out, then failed by the test"},
            "ResponseMetadata": {"HTTPStatusCode": self.status},
        }
        raise ClientError(error, self.operation)  # type: ignore[arg-type]


def record_requests(client: BaseClient, operation: str) -> list[dict[str, Any]]:
    """The parameters of every later call of `operation` (as sent: flattened query fields)."""
    requests: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        requests.append(dict(params["body"]))

    client.meta.events.register(f"before-call.ec2.{operation}", record)
    return requests


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
