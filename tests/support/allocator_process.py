"""Runs the real `ipam-allocator` as a subprocess for tests (a real gRPC server on a socket)."""

from __future__ import annotations

import time
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .redis_server import free_port, free_port_block
from .service_process import ServiceProcess

ADMIN_TOKEN = "test-admin-token"
CLIENT_TOKEN = "test-client-token"


class AllocatorProcess(ServiceProcess):
    """`python -m services.allocator` with settings from `IPAM_*` variables."""

    module = "services.allocator"

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
        self.metrics_port = free_port_block(workers)  # worker i serves metrics on this port + i
        defaults = {
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
        super().__init__(defaults, settings)

    def start(self, timeout: float = 20.0) -> Self:
        self.spawn()
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
