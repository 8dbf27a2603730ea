"""Two workers on one node after a failover took the node lock with it: the real worker holds the
node now, and a former holder, its lock lost, still acts on a stale view of the cloud through the
worker's own allocator client. Its changes are refused (STALE_FENCING_TOKEN); no address is in the
pool that the cloud does not hold (handed out, it could be another node's: a duplicate), and none
the cloud holds is missing from it (lost)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from botocore.client import BaseClient

from clients.client import AsyncIpamClient, IpamClientError
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker import fencing
from services.cloudworker.allocator_grpc import GrpcAllocator
from services.cloudworker.model import NetworkInterface
from services.core.family import Family
from services.core.reasons import ErrorReason
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import DemoNetwork, MotoServer, ec2_client, run_instance
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess


@dataclass
class Cloud:
    redis_url: str
    allocator: AllocatorProcess
    api: Api
    ec2: BaseClient
    network: DemoNetwork


@pytest.fixture
def cloud(moto_server: MotoServer, demo_network: DemoNetwork) -> Iterator[Cloud]:
    redis = RedisServer().start()
    allocator = AllocatorProcess(redis.url).start()
    worker = WorkerProcess(redis.url, allocator.address, moto_server.endpoint_url).start()
    api = Api(allocator.address)
    try:
        yield Cloud(redis.url, allocator, api, ec2_client(moto_server.endpoint_url), demo_network)
    finally:
        api.close()
        worker.stop()
        allocator.stop()
        redis.close()


def _attached(ec2: BaseClient, instance_id: str) -> tuple[list[dict], set[str]]:  # type: ignore[type-arg]
    """The instance's interfaces, and every secondary IPv4 address on them, as EC2 holds them."""
    reply = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])
    interfaces = reply["NetworkInterfaces"]
    return interfaces, {a["PrivateIpAddress"] for i in interfaces for a in i["PrivateIpAddresses"] if not a["Primary"]}


def _pool(api: Api, node: str) -> set[str]:
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
    return set(dump.ipv4) | set(dump.free_ipv4)


def test_a_former_lock_holder_is_refused_and_no_address_is_duplicated_or_lost(cloud: Cloud) -> None:
    instance_id = run_instance(cloud.ec2, cloud.network, "m5.large")
    node = cloud.api.create_node(instance_id=instance_id, instance_type="m5.large")
    poll(
        lambda: (
            len(_attached(cloud.ec2, instance_id)[1]) == 8
            and _pool(cloud.api, node) == _attached(cloud.ec2, instance_id)[1]
        )
    )

    async def former_holder_takes_the_lock() -> int:
        client = aioredis.Redis.from_url(cloud.redis_url)
        try:
            return await fencing.take_token(client, node)
        finally:
            await client.aclose()

    # Worker A took the node's lock, read the cloud, and then lost the lock with the master.
    stale_token = asyncio.run(former_holder_takes_the_lock())
    interfaces, stale_view = _attached(cloud.ec2, instance_id)
    eni = next(i for i in interfaces if any(not a["Primary"] for a in i["PrivateIpAddresses"]))

    # The real worker takes the node meanwhile and gives 6 of its 8 addresses back.
    spec = npb.NodeSpec(
        name=node, instance_id=instance_id, instance_type="m5.large", pre_allocate=2, release_excess=True
    )
    cloud.api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=spec), timeout=5)
    poll(
        lambda: (
            len(_attached(cloud.ec2, instance_id)[1]) == 2
            and _pool(cloud.api, node) == _attached(cloud.ec2, instance_id)[1]
        )
    )
    given_back = stale_view - _attached(cloud.ec2, instance_id)[1]
    assert len(given_back) == 6

    # A resumes from its stale view: the addresses it saw attached go "back" into the pool, and it
    # reserves free ones to release. Both go through the worker's own client, with A's token.
    async def former_holder_acts() -> list[str]:
        refused = []
        client = GrpcAllocator(AsyncIpamClient(cloud.allocator.address, token=ADMIN_TOKEN, timeout=5))
        interface = NetworkInterface(
            id=eni["NetworkInterfaceId"],
            mac=eni["MacAddress"],
            device_index=eni["Attachment"]["DeviceIndex"],
            subnet_id=eni["SubnetId"],
            subnet_cidr="",
            primary_ip=eni["PrivateIpAddress"],
        )
        try:
            with fencing.holding(stale_token):
                for call in (
                    client.add_addresses(node, interface, sorted(stale_view)),
                    client.reserve_for_release(node, "", 2, Family.IPV4),
                ):
                    try:
                        await call
                    except IpamClientError as exc:
                        refused.append(exc.reason)
        finally:
            await client.close()
        return refused

    refused = asyncio.run(former_holder_acts())
    in_cloud = _attached(cloud.ec2, instance_id)[1]
    assert _pool(cloud.api, node) == in_cloud  # nothing the cloud gave back (a duplicate to be), nothing lost
    assert cloud.api.stats(node).reserved_ips == 0
    assert refused == [ErrorReason.STALE_FENCING_TOKEN] * 2
