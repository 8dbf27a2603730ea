"""Prefix delegation end to end: real Redis, the local EC2 (which delegates /28 prefixes as EC2 does)
over HTTP, the real allocator; the worker as a process, or its maintainer driven by the test where
a clock or a moment matters."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.client import BaseClient
from prometheus_client import CollectorRegistry

from clients.client import AsyncIpamClient
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker.allocator_grpc import GrpcAllocator
from services.cloudworker.maintainer import NodeMaintainer, Outcome
from services.cloudworker.metrics import WorkerMetrics
from services.cloudworker.providers.aws import AwsProvider, RetryPolicy
from services.cloudworker.ratelimit import TokenBucket
from services.core.reasons import DeficitReason
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import (
    AVAILABILITY_ZONE,
    DEMO_IMAGE_ID,
    Ec2Fault,
    Ec2FaultAfterCall,
    MotoServer,
    ec2_client,
    record_requests,
)
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

_vpc_numbers = itertools.count(1)


@dataclass
class Vpc:
    """A VPC of its own per test: its subnets (the first holds the instances) and a security group."""

    id: str
    subnet_ids: list[str]
    subnet_cidrs: list[str]
    security_group_id: str


@dataclass
class Cloud:
    api: Api
    ec2: BaseClient
    moto: MotoServer
    allocator: AllocatorProcess
    redis_url: str

    def vpc(self, *subnet_prefix_lengths: int) -> Vpc:
        """A fresh VPC 10.<n>.0.0/16 with one subnet of each prefix length, lowest first."""
        cidr = ipaddress.ip_network(f"10.{next(_vpc_numbers)}.0.0/16")
        vpc_id = self.ec2.create_vpc(CidrBlock=str(cidr))["Vpc"]["VpcId"]
        subnet_ids, cidrs = [], []
        start = cidr.network_address
        for length in subnet_prefix_lengths:
            block = ipaddress.ip_network(f"{start}/{length}")
            subnet = self.ec2.create_subnet(VpcId=vpc_id, CidrBlock=str(block), AvailabilityZone=AVAILABILITY_ZONE)
            subnet_ids.append(subnet["Subnet"]["SubnetId"])
            cidrs.append(str(block))
            start = block.network_address + 256 * ((block.num_addresses + 255) // 256)
        group = self.ec2.create_security_group(GroupName=f"pods-{vpc_id}", Description="pods", VpcId=vpc_id)
        return Vpc(vpc_id, subnet_ids, cidrs, group["GroupId"])

    def node(self, vpc: Vpc, instance_type: str = "m5.large", **spec: object) -> tuple[str, str]:
        instance_id = self.ec2.run_instances(
            ImageId=DEMO_IMAGE_ID,
            MinCount=1,
            MaxCount=1,
            InstanceType=instance_type,
            SubnetId=vpc.subnet_ids[0],
            SecurityGroupIds=[vpc.security_group_id],
            Placement={"AvailabilityZone": AVAILABILITY_ZONE},
        )["Instances"][0]["InstanceId"]
        spec.setdefault("prefix_delegation", True)
        name = self.api.create_node(instance_id=instance_id, instance_type=instance_type, **spec)
        return name, instance_id

    def interfaces(self, instance_id: str) -> list[dict[str, Any]]:
        reply = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
        )
        return sorted(reply["NetworkInterfaces"], key=lambda i: i["Attachment"]["DeviceIndex"])

    def prefixes(self, instance_id: str) -> list[str]:
        return [p["Ipv4Prefix"] for i in self.interfaces(instance_id) for p in i.get("Ipv4Prefixes", [])]

    def secondaries(self, instance_id: str) -> list[str]:
        return [
            a["PrivateIpAddress"]
            for i in self.interfaces(instance_id)
            for a in i["PrivateIpAddresses"]
            if not a["Primary"]
        ]

    def pool(self, node: str) -> set[str]:
        dump = self.api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
        return set(dump.ipv4) | set(dump.free_ipv4)

    def allocate(self, node: str, owner: str, *, wait: bool = False) -> pb.AllocationResult:
        request = pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner, wait_for_refill=wait)
        return self.api.alloc.AllocateNext(request, timeout=30).ipv4


class Maintainer:
    """The worker's maintainer in the test's hands, on an event loop of its own (so it keeps its
    back-offs from one maintenance to the next, as in a worker), with a clock the test moves."""

    def __init__(self, cloud: Cloud, *, prefix_backoff_seconds: float = 120.0) -> None:
        self.now = 0.0
        self.client = ec2_client(cloud.moto.endpoint_url)
        self.metrics = WorkerMetrics(CollectorRegistry())
        provider = AwsProvider(
            self.client,
            cluster="ipam",
            limiter=TokenBucket(100, 100),
            retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
            observer=self.metrics.cloud.observer("aws"),
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def connect() -> tuple[AsyncIpamClient, NodeMaintainer]:
            allocator = AsyncIpamClient(cloud.allocator.address, token=ADMIN_TOKEN)
            maintainer = NodeMaintainer(
                provider,
                GrpcAllocator(allocator),
                self.metrics,
                stale_reservation_seconds=60,
                prefix_backoff_seconds=prefix_backoff_seconds,
                clock=lambda: self.now,
            )
            return allocator, maintainer

        self._allocator, self._maintainer = self._run(connect())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def maintain(self, node: str) -> Outcome:
        return self._run(self._maintainer.maintain(node))

    def forget(self, instance_id: str) -> None:
        """Its view of the instance's interfaces goes: the next maintenance reads EC2."""
        self._maintainer.view.forget(instance_id)

    def close(self) -> None:
        self._run(self._allocator.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture
def maintainer(cloud: Cloud) -> Iterator[Maintainer]:
    m = Maintainer(cloud, prefix_backoff_seconds=120)
    yield m
    m.close()


@pytest.fixture(scope="module")
def local_ec2() -> Iterator[MotoServer]:
    with MotoServer(local_ec2=True) as server:
        yield server


@pytest.fixture(scope="module")
def cloud(local_ec2: MotoServer) -> Iterator[Cloud]:
    """An allocator with no worker: a test starts the worker it needs, or drives the maintainer."""
    with RedisServer() as redis, AllocatorProcess(redis.url) as allocator:
        api = Api(allocator.address)
        yield Cloud(api, ec2_client(local_ec2.endpoint_url), local_ec2, allocator, redis.url)
        api.close()


def fragment(cloud: Cloud, vpc: Vpc, subnet: int, *, free_blocks: int = 0) -> list[str]:
    """Takes one address inside every /28 of the subnet but the last `free_blocks` eligible ones
    (the first and last /28 hold reserved addresses: never eligible); returns the interfaces made."""
    network = ipaddress.ip_network(vpc.subnet_cidrs[subnet])
    blocks = list(network.subnets(new_prefix=28))[1:-1]
    taken = blocks[: len(blocks) - free_blocks]
    return [
        cloud.ec2.create_network_interface(SubnetId=vpc.subnet_ids[subnet], PrivateIpAddress=str(b[4]))[
            "NetworkInterface"
        ]["NetworkInterfaceId"]
        for b in taken
    ]


def test_a_deficit_is_met_with_a_prefix_whose_16_addresses_all_join_the_pool(cloud: Cloud) -> None:
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc)  # pre_allocate 8: one prefix
    with WorkerProcess(cloud.redis_url, cloud.allocator.address, cloud.moto.endpoint_url) as worker:
        poll(lambda: cloud.api.stats(node).available_ips == 16, timeout=30)
        (prefix,) = cloud.prefixes(instance_id)
        block = ipaddress.ip_network(prefix)
        assert block.prefixlen == 28 and block != next(ipaddress.ip_network(vpc.subnet_cidrs[0]).subnets(new_prefix=28))
        assert cloud.secondaries(instance_id) == []
        assert cloud.pool(node) == {str(a) for a in block}  # .0 and .15 of the /28 included

        # 20 more callers: ⌈(20 + 8 − 16 free) / 16⌉ more prefixes, on eth0's free slots.
        for i in range(20):
            cloud.allocate(node, f"pod-{i}", wait=True)
        poll(lambda: cloud.api.stats(node).available_ips - cloud.api.stats(node).used_ips >= 8, timeout=30)
        # The pool holds every address of the prefixes EC2 holds (a step under way added last).
        poll(
            lambda: cloud.pool(node) == {str(a) for p in cloud.prefixes(instance_id) for a in ipaddress.ip_network(p)},
            timeout=30,
        )
        assert cloud.secondaries(instance_id) == []
        assert len(cloud.interfaces(instance_id)) == 1
        assert worker.stop() == 0, worker.log_text()[-3000:]


def prefix_requests(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in requests if r.get("Ipv4PrefixCount")]


def failed_calls(m: Maintainer, operation: str, code: str) -> float:
    sample = m.metrics.registry.get_sample_value(
        "ipam_worker_cloud_api_duration_seconds_count",
        {"provider": "aws", "operation": operation, "response_code": code},
    )
    return sample or 0.0


@pytest.mark.parametrize(("instance_type", "capacity", "per_interface"), [("m5.large", 432, 9), ("t3.small", 144, 3)])
def test_prefixes_fill_every_free_slot_and_never_one_past_the_limit(
    cloud: Cloud, maintainer: Maintainer, instance_type: str, capacity: int, per_interface: int
) -> None:
    """(interfaces − 0) × (slots − 1) × 16 addresses: an m5.large holds 432 instead of 27."""
    vpc = cloud.vpc(22)
    node, instance_id = cloud.node(vpc, instance_type, pre_allocate=1000)
    for _ in range(3):
        maintainer.maintain(node)
    stats = cloud.api.stats(node)
    assert stats.available_ips == capacity
    assert stats.deficit_reason == DeficitReason.AT_CAPACITY
    assert [len(i.get("Ipv4Prefixes", [])) for i in cloud.interfaces(instance_id)] == [per_interface] * 3
    assert cloud.secondaries(instance_id) == []
    assert failed_calls(maintainer, "AssignPrivateIpAddresses", "PrivateIpAddressLimitExceeded") == 0


def test_a_type_that_takes_no_prefixes_gets_secondaries_and_the_node_says_why(
    cloud: Cloud, maintainer: Maintainer
) -> None:
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc, "c4.large")
    assigns = record_requests(maintainer.client, "AssignPrivateIpAddresses")
    maintainer.maintain(node)
    assert len(cloud.secondaries(instance_id)) == 8
    assert cloud.prefixes(instance_id) == []
    assert assigns and prefix_requests(assigns) == []  # no prefix call EC2 would refuse
    shown = cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert shown.last_error.startswith(DeficitReason.PREFIX_DELEGATION_UNSUPPORTED)
    assert "c4.large" in shown.last_error


@pytest.mark.parametrize(
    ("error", "free_blocks", "pre_allocate"),
    [
        ("InsufficientCidrBlocks", 0, 8),  # fragmented: free addresses, no free /28
        ("InvalidParameterValue", 0, 8),  # EC2's other answer to the same
        ("InsufficientCidrBlocks", 1, 20),  # one /28 free, two asked: all or nothing
    ],
)
def test_a_subnet_without_a_free_prefix_falls_back_to_secondaries_then_drifts_back(
    cloud: Cloud, maintainer: Maintainer, error: str, free_blocks: int, pre_allocate: int
) -> None:
    # A /24: the secondaries EC2 places at random cannot take all of its 14 eligible /28s again.
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc, subnet_ids=[vpc.subnet_ids[0]], pre_allocate=pre_allocate, release_excess=True)
    fillers = fragment(cloud, vpc, 0, free_blocks=free_blocks)
    cloud.moto.configure(prefix_capacity_error=error)
    try:
        assigns = record_requests(maintainer.client, "AssignPrivateIpAddresses")
        maintainer.maintain(node)
    finally:
        cloud.moto.configure(prefix_capacity_error="InsufficientCidrBlocks")
    assert failed_calls(maintainer, "AssignPrivateIpAddresses", error) == 1
    assert cloud.prefixes(instance_id) == []  # nothing of a refused request is assigned
    assert len(cloud.secondaries(instance_id)) == pre_allocate  # the deficit met all the same
    assert cloud.pool(node) == set(cloud.secondaries(instance_id))

    # The subnet has room again, but prefixes are not asked of it before the back-off is over.
    for interface_id in fillers:
        cloud.ec2.delete_network_interface(NetworkInterfaceId=interface_id)
    cloud.allocate(node, "pod-1")
    asked = len(assigns)
    maintainer.maintain(node)
    assert prefix_requests(assigns[asked:]) == []
    assert len(cloud.secondaries(instance_id)) == pre_allocate + 1

    # Past it, new capacity comes as a prefix; the next maintenance gives the free secondaries back first.
    maintainer.now += 120
    cloud.allocate(node, "pod-2")
    maintainer.maintain(node)
    assert len(cloud.prefixes(instance_id)) == 1
    maintainer.maintain(node)
    (prefix,) = cloud.prefixes(instance_id)
    stats = cloud.api.stats(node)
    free = stats.available_ips - stats.used_ips
    singles = cloud.secondaries(instance_id)
    assert len(singles) < pre_allocate + 1  # free secondaries given back, the prefix kept
    assert free >= pre_allocate  # never below the watermark
    assert free == pre_allocate or len(singles) == 2  # down to it, or no free secondary left (2 pods hold theirs)
    assert cloud.pool(node) == set(singles) | {str(a) for a in ipaddress.ip_network(prefix)}


def test_a_subnet_without_a_free_prefix_sends_the_prefix_to_another_subnet(
    cloud: Cloud, maintainer: Maintainer
) -> None:
    vpc = cloud.vpc(26, 24)
    node, instance_id = cloud.node(vpc, subnet_ids=[vpc.subnet_ids[1]])
    fragment(cloud, vpc, 0)
    maintainer.maintain(node)
    eth0, eth1 = cloud.interfaces(instance_id)
    assert eth0.get("Ipv4Prefixes", []) == [] and len(eth0["PrivateIpAddresses"]) == 1
    assert eth1["SubnetId"] == vpc.subnet_ids[1]
    assert len(eth1["Ipv4Prefixes"]) == 1
    assert cloud.secondaries(instance_id) == []
    assert cloud.api.stats(node).available_ips == 16


def test_a_prefix_removed_behind_the_worker_s_back_marks_its_allocated_addresses_lost(
    cloud: Cloud, maintainer: Maintainer
) -> None:
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc)
    maintainer.maintain(node)
    (prefix,) = cloud.prefixes(instance_id)
    taken = {cloud.allocate(node, f"pod-{i}").ip for i in range(2)}
    eth0 = cloud.interfaces(instance_id)[0]["NetworkInterfaceId"]
    cloud.ec2.unassign_private_ip_addresses(NetworkInterfaceId=eth0, Ipv4Prefixes=[prefix])
    # Someone else takes an address of it meanwhile: the refill gets another /28.
    cloud.ec2.create_network_interface(
        SubnetId=vpc.subnet_ids[0], PrivateIpAddress=str(ipaddress.ip_network(prefix)[-1])
    )

    maintainer.forget(instance_id)  # as the resync's read of the VPC finds it
    maintainer.maintain(node)
    stats = cloud.api.stats(node)
    assert stats.lost_ips == 2
    allocated, free = cloud.api.dump(node)
    assert {ip for ip, owner in allocated.items() if owner.startswith("pod-")} >= taken  # owners keep them
    gone = {str(a) for a in ipaddress.ip_network(prefix)} - taken
    assert not gone & set(free)  # the free ones left the pool
    (new_prefix,) = cloud.prefixes(instance_id)  # the deficit it left met with a new prefix
    assert new_prefix != prefix
    assert cloud.pool(node) - taken == {str(a) for a in ipaddress.ip_network(new_prefix)}


def test_only_a_prefix_whose_16_addresses_are_free_goes_back_and_the_pool_then_holds_still(
    cloud: Cloud, maintainer: Maintainer
) -> None:
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc, release_excess=True)  # pre_allocate 8
    maintainer.maintain(node)
    for i in range(17):  # the first prefix filled, one address of a second in use
        cloud.allocate(node, f"pod-{i}")
        if cloud.api.stats(node).needed_ips > 0:
            maintainer.maintain(node)
    first, second = cloud.prefixes(instance_id)
    mutating = [
        record_requests(maintainer.client, op)
        for op in ("AssignPrivateIpAddresses", "UnassignPrivateIpAddresses", "CreateNetworkInterface")
    ]

    def calls() -> int:
        return sum(len(r) for r in mutating)

    maintainer.maintain(node)  # 15 free, 7 above the watermark: less than a prefix, nothing goes
    assert calls() == 0

    allocated, _ = cloud.api.dump(node)
    in_first = {ip for ip in allocated if ipaddress.ip_address(ip) in ipaddress.ip_network(first)}
    in_second = set(allocated) - in_first
    assert len(in_first) == 16 and len(in_second) == 1
    for ip in sorted(in_first)[:15]:  # one address of the first prefix still in use: both kept
        cloud.api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)
    maintainer.maintain(node)
    assert calls() == 0 and cloud.prefixes(instance_id) == [first, second]

    cloud.api.alloc.Release(pb.ReleaseRequest(node=node, ip=sorted(in_first)[15]), timeout=5)
    maintainer.maintain(node)  # the first prefix wholly free: it alone goes, whole
    (unassign,) = mutating[1]
    assert unassign["Ipv4Prefix.1"] == first and not any(k.startswith("PrivateIpAddress") for k in unassign)
    assert cloud.prefixes(instance_id) == [second]
    stats = cloud.api.stats(node)
    assert stats.available_ips == 16 and stats.used_ips == 1  # 15 free: never below the watermark
    assert cloud.pool(node) == {str(a) for a in ipaddress.ip_network(second)}

    for _ in range(10):  # neither a deficit nor a prefix's worth of excess: nothing moves
        maintainer.maintain(node)
    assert calls() == 1


@pytest.mark.parametrize("carried_out", [True, False])
def test_a_prefix_unassign_answered_500_is_settled_by_reading_the_interface_back(
    cloud: Cloud, maintainer: Maintainer, carried_out: bool
) -> None:
    """EC2 answered 500 to the unassign, having done it or not: the interface is read back, and the
    prefix leaves the pool only if EC2 no longer holds it (else it returns whole)."""
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc, release_excess=True, pre_allocate=20)  # two prefixes
    maintainer.maintain(node)
    first, second = cloud.prefixes(instance_id)
    cloud.api.nodes.UpdateNode(
        npb.UpdateNodeRequest(
            spec=npb.NodeSpec(
                name=node,
                instance_id=instance_id,
                instance_type="m5.large",
                prefix_delegation=True,
                release_excess=True,
            )
        ),
        timeout=5,
    )  # pre_allocate 8 again: one prefix in excess
    fault = (Ec2FaultAfterCall if carried_out else Ec2Fault)(
        maintainer.client, "UnassignPrivateIpAddresses", "InternalError", status=500
    )
    with pytest.raises(Exception, match="InternalError"):
        maintainer.maintain(node)
    assert fault.injected == 1
    held = cloud.prefixes(instance_id)
    assert held == ([first] if carried_out else [first, second])
    assert cloud.pool(node) == {str(a) for p in held for a in ipaddress.ip_network(p)}
    assert list(cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).reservations) == []
