"""Runs the real `ipam-cloudworker` as a subprocess for tests."""

from __future__ import annotations

from .allocator_process import ADMIN_TOKEN
from .moto_server import DUMMY_KEY, REGION
from .redis_server import free_port
from .service_process import ServiceProcess


class WorkerProcess(ServiceProcess):
    """`python -m services.cloudworker` against a Redis, an allocator and the moto server."""

    module = "services.cloudworker"

    def __init__(self, redis_url: str, allocator_address: str, ec2_endpoint_url: str, **settings: object) -> None:
        self.metrics_port = free_port()
        defaults = {
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
            "IPAM_HEARTBEAT_SECONDS": "6",  # renewed every 2 s: a loaded machine does not make it miss one
            "IPAM_NODE_LOCK_SECONDS": "5",
            "IPAM_RESYNC_INTERVAL_SECONDS": "3600",
            "IPAM_EXCESS_RELEASE_DELAY_SECONDS": "0",  # excess given back at once, unless a test says otherwise
            "IPAM_LOG_LEVEL": "INFO",
        }
        super().__init__(defaults, settings)
