"""Two workers on one node after a failover took the node lock with it.

A former holder acting on a stale view of the cloud through the worker's own allocator client, and
two real workers, one of them held mid-maintenance while the other takes the node: the former
holder's changes are refused (STALE_FENCING_TOKEN); no address is in the pool that the cloud does
not hold (handed out, it could be another node's: a duplicate), and none the cloud holds is missing
from it (lost)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from botocore.client import BaseClient

from clients.client import AsyncIpamClient
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker import fencing
from services.cloudworker.allocator_client import AllocatorError
from services.cloudworker.allocator_grpc import GrpcAllocator
from services.cloudworker.model import NetworkInterface
from services.core import contract
from services.core.family import Family
from services.core.reasons import ErrorReason
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.ec2_fault_proxy import Ec2FaultProxy
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


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return ""


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
                    except AllocatorError as exc:
                        refused.append(exc.reason)
        finally:
            await client.close()
        return refused

    refused = asyncio.run(former_holder_acts())
    in_cloud = _attached(cloud.ec2, instance_id)[1]
    assert _pool(cloud.api, node) == in_cloud  # nothing the cloud gave back (a duplicate to be), nothing lost
    assert cloud.api.stats(node).reserved_ips == 0
    assert refused == [ErrorReason.STALE_FENCING_TOKEN] * 2


def test_a_worker_whose_lock_was_lost_mid_maintenance_is_refused_and_nothing_is_lost(
    moto_server: MotoServer, demo_network: DemoNetwork
) -> None:
    """Two real workers: A's assignment is held on its way to EC2 while a failover loses A's lock;
    B takes the node and fills it; then A's assignment goes through and its AddAddresses is refused.
    What A attached is found in the cloud by the next maintenance: in the pool once, nothing lost."""
    ec2 = ec2_client(moto_server.endpoint_url)
    with RedisServer() as redis, Ec2FaultProxy(moto_server.endpoint_url, seed=1) as proxy:
        allocator = AllocatorProcess(redis.url).start()
        api = Api(allocator.address)
        # A renews its lock only every 30 s: it does not notice the loss before its change is sent;
        # nor does it claim its own event again meanwhile (B does).
        a = WorkerProcess(
            redis.url,
            allocator.address,
            proxy.endpoint_url,
            consumer_name="a",
            node_lock_seconds=90,
            claim_idle_seconds=60,
        )
        b = WorkerProcess(redis.url, allocator.address, moto_server.endpoint_url, consumer_name="b")
        try:
            a.start()
            # Its first resync (of no node) done: from now on A maintains the node only on its event.
            poll(lambda: "ipam_worker_resync_total 1.0" in _metrics(a.metrics_port), timeout=30, interval=0.2)
            proxy.hold("AssignPrivateIpAddresses")
            instance_id = run_instance(ec2, demo_network, "m5.large")
            node = api.create_node(instance_id=instance_id, instance_type="m5.large", pre_allocate=4)
            poll(lambda: proxy.held == 1, timeout=30, describe=a.log_tail)
            redis.client().delete(f"{contract.node_prefix(node)}:worklock")  # lost with the master

            b.start()  # its first resync takes the node, with a newer token, and fills it
            poll(lambda: api.stats(node).available_ips == 4, timeout=30, describe=b.log_tail)
            proxy.release()
            poll(lambda: "another worker holds it now" in a.log_text(), timeout=30, describe=a.log_tail)

            # A's 4 addresses are attached but were refused: the next maintenance (on the event of an
            # allocation) finds them attached and hands them over.
            api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod"), timeout=5)

            def settled() -> bool:
                in_cloud = _attached(ec2, instance_id)[1]
                return len(in_cloud) >= 8 and _pool(api, node) == in_cloud

            poll(settled, timeout=30, describe=lambda: f"{_pool(api, node)} vs {_attached(ec2, instance_id)[1]}")
        finally:
            api.close()
            for worker in (a, b):
                worker.stop()
            allocator.stop()
