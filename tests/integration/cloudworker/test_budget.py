"""One EC2 budget for every worker replica, in Redis: real Redis, the moto server over HTTP, the
real allocator; the replicas are maintainers driven here, each with its own EC2 client and limiter."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.client import BaseClient
from prometheus_client import CollectorRegistry

from clients.client import AsyncIpamClient
from services.cloudworker.allocator_grpc import GrpcAllocator
from services.cloudworker.maintainer import NodeMaintainer
from services.cloudworker.metrics import WorkerMetrics
from services.cloudworker.providers.aws import AwsProvider, Ec2Budget, RetryPolicy
from services.cloudworker.ratelimit import Priority, RedisRateLimiter, at_priority, connect_sync
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import DemoNetwork, Ec2Fault, MotoServer, ec2_client, run_instance
from tests.support.polling import poll
from tests.support.redis_server import RedisServer


def _operation(body: Any) -> str:
    text = body.decode() if isinstance(body, bytes) else str(body)
    return next((p.split("=", 1)[1] for p in text.split("&") if p.startswith("Action=")), "")


@dataclass
class Replica:
    """A worker's maintainer with its own EC2 client and its own connection to the shared budget."""

    client: BaseClient
    limiter: RedisRateLimiter
    metrics: WorkerMetrics
    sent: list[tuple[float, str]] = field(default_factory=list)  # (when, operation) of calls reaching EC2

    def __post_init__(self) -> None:
        lock = threading.Lock()

        def record(request: Any, **_: Any) -> None:
            with lock:
                self.sent.append((time.monotonic(), _operation(request.body)))

        # Sent over HTTP: the calls a fault answers in EC2's place never get here.
        self.client.meta.events.register("before-send.ec2", record)

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def maintain(self, allocator_address: str, nodes: list[str]) -> None:
        provider = AwsProvider(
            self.client,
            cluster="ipam",
            limiter=self.limiter,
            retry=RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.05),
        )
        async with AsyncIpamClient(allocator_address, token=ADMIN_TOKEN) as allocator:
            maintainer = NodeMaintainer(provider, GrpcAllocator(allocator), self.metrics, stale_reservation_seconds=60)
            await asyncio.gather(*(maintainer.maintain(node) for node in nodes))


@dataclass
class Setup:
    api: Api
    allocator: AllocatorProcess
    redis: RedisServer
    moto: MotoServer
    network: DemoNetwork
    ec2: BaseClient

    def replica(self, budget: Ec2Budget, scope: str, **limiter: Any) -> Replica:
        metrics = WorkerMetrics(CollectorRegistry())
        shared = RedisRateLimiter(
            connect_sync(self.redis.url, cluster=False),
            budget,
            scope=scope,
            observer=metrics.cloud.observer("aws"),
            **limiter,
        )
        return Replica(ec2_client(self.moto.endpoint_url), shared, metrics)

    def nodes(self, count: int, **spec: object) -> list[str]:
        return [
            self.api.create_node(
                instance_id=run_instance(self.ec2, self.network, "m5.large"), instance_type="m5.large", **spec
            )
            for _ in range(count)
        ]


@pytest.fixture(scope="module")
def setup(moto_server: MotoServer, demo_network: DemoNetwork) -> Iterator[Setup]:
    """An allocator with no worker consuming its events: the tests drive the replicas."""
    with RedisServer() as own_redis, AllocatorProcess(own_redis.url) as allocator:
        api = Api(allocator.address)
        yield Setup(api, allocator, own_redis, moto_server, demo_network, ec2_client(moto_server.endpoint_url))
        api.close()


def test_two_replicas_together_stay_within_the_configured_rate(setup: Setup) -> None:
    rate, burst = 20.0, 10
    budget = Ec2Budget(qps=rate, burst=burst)
    scope = f"test-{uuid.uuid4().hex}"
    replicas = [setup.replica(budget, scope) for _ in range(2)]
    nodes = setup.nodes(10)

    async def both() -> None:
        with at_priority(Priority.REFILL):
            await asyncio.gather(
                replicas[0].maintain(setup.allocator.address, nodes[::2]),
                replicas[1].maintain(setup.allocator.address, nodes[1::2]),
            )

    asyncio.run(both())
    assert all(setup.api.stats(node).available_ips == 8 for node in nodes)
    sent = sorted(stamp for r in replicas for stamp, _ in r.sent)
    assert all(r.sent for r in replicas)  # both replicas called EC2
    # Each replica alone could spend the whole budget; together they spent it once.
    assert len(sent) <= burst + rate * (sent[-1] - sent[0]) + 1
    for i, first in enumerate(sent):
        in_window = sum(1 for s in sent[i:] if s < first + 1.0)
        assert in_window <= burst + rate + 1
    counted = sum(
        r.sample("ipam_worker_cloud_calls_total", provider="aws", operation="AssignPrivateIpAddresses", bucket="all")
        for r in replicas
    )
    assert counted == sum(1 for r in replicas for _, op in r.sent if op == "AssignPrivateIpAddresses") >= 10


def test_request_limit_exceeded_lowers_the_rate_the_refill_completes_and_the_rate_climbs_back(setup: Setup) -> None:
    budget = Ec2Budget(qps=50, burst=20)
    # Slow enough a climb to sample the rate below 0.5 on a busy machine, fast enough to see it recover.
    replica = setup.replica(budget, f"test-{uuid.uuid4().hex}", recover_per_s=0.2)
    throttled = Ec2Fault(replica.client, "AssignPrivateIpAddresses", "RequestLimitExceeded", times=3, status=503)
    (node,) = setup.nodes(1)

    async def refill() -> None:
        with at_priority(Priority.REFILL):
            await replica.maintain(setup.allocator.address, [node])

    asyncio.run(refill())
    assert throttled.injected == 3
    assert setup.api.stats(node).available_ips == 8  # the refill completed
    assert (
        replica.sample(
            "ipam_worker_cloud_throttled_total", provider="aws", operation="AssignPrivateIpAddresses", bucket="all"
        )
        == 3
    )
    # Three halvings: the call that got through took its token at about an eighth of the rate.
    assert replica.sample("ipam_worker_cloud_bucket_rate_factor", provider="aws", bucket="all") < 0.5
    bucket = budget.bucket_for("AssignPrivateIpAddresses")

    def recovered() -> bool:
        replica.limiter.acquire("DescribeVpcs")
        return replica.limiter.state(bucket)[1] >= 1.0

    poll(recovered, timeout=10, interval=0.2)
    assert replica.sample("ipam_worker_cloud_bucket_rate_factor", provider="aws", bucket="all") == 1.0
