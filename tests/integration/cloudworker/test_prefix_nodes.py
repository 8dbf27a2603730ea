"""Prefix nodes across the worker and the allocator, end to end with the local EC2 (over HTTP): IPv6
in prefix mode (one /80 per node on its primary interface, handed to the real allocator as the
pool's IPv6 prefix, its addresses handed out one by one and never written out), and callers waiting
for a refill served by /28 prefixes."""

from __future__ import annotations

import ipaddress
import itertools
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from botocore.client import BaseClient

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from tests.integration.cloudworker.test_prefixes import Cloud, Maintainer
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import (
    AVAILABILITY_ZONE,
    DEMO_IMAGE_ID,
    Ec2FaultAfterCall,
    MotoServer,
    ec2_client,
    record_requests,
)
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

_vpc_numbers = itertools.count(101)
GATEWAY = "fe80:ec2::1"


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    with MotoServer(local_ec2=True) as ec2, RedisServer() as redis, AllocatorProcess(redis.url) as allocator:
        api = Api(allocator.address)
        yield Cloud(api, ec2_client(ec2.endpoint_url), ec2, allocator, redis.url)
        api.close()


@pytest.fixture
def maintainer(cloud: Cloud) -> Iterator[Maintainer]:
    m = Maintainer(cloud)
    yield m
    m.close()


def dual_stack_node(cloud: Cloud, **spec: object) -> tuple[str, str, ipaddress.IPv6Network]:
    """A dual-stack prefix node on an m5.large in a subnet of its own with an IPv6 /64; returns the
    node, its instance and the /64."""
    ec2: BaseClient = cloud.ec2
    vpc = ec2.create_vpc(CidrBlock=f"10.{next(_vpc_numbers)}.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    described = ec2.describe_vpcs(VpcIds=[vpc["VpcId"]])["Vpcs"][0]
    block = ipaddress.IPv6Network(described["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"])
    ipv6_subnet = next(block.subnets(new_prefix=64))
    ipv4_subnet = next(ipaddress.ip_network(vpc["CidrBlock"]).subnets(new_prefix=24))
    subnet_id = ec2.create_subnet(
        VpcId=vpc["VpcId"],
        CidrBlock=str(ipv4_subnet),
        Ipv6CidrBlock=str(ipv6_subnet),
        AvailabilityZone=AVAILABILITY_ZONE,
    )["Subnet"]["SubnetId"]
    instance_id = ec2.run_instances(
        ImageId=DEMO_IMAGE_ID,
        MinCount=1,
        MaxCount=1,
        InstanceType="m5.large",
        SubnetId=subnet_id,
        Placement={"AvailabilityZone": AVAILABILITY_ZONE},
    )["Instances"][0]["InstanceId"]
    spec = {"prefix_delegation": True, "ipv6_enabled": True, **spec}
    name = cloud.api.create_node(instance_id=instance_id, instance_type="m5.large", **spec)
    return name, instance_id, ipv6_subnet


def ipv6_prefixes(cloud: Cloud, instance_id: str) -> list[list[str]]:
    """Each interface's IPv6 prefixes as EC2 lists them, by device index."""
    return [[p["Ipv6Prefix"] for p in i.get("Ipv6Prefixes", [])] for i in cloud.interfaces(instance_id)]


def pool_prefix(cloud: Cloud, node: str) -> str:
    return cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).ipv6_prefix


def redis_bytes(cloud: Cloud) -> int:
    """What every key of the store takes (MEMORY USAGE), the allocator's and the worker's."""
    client = redis.Redis.from_url(cloud.redis_url)
    try:
        return sum(int(client.memory_usage(key, samples=0) or 0) for key in client.scan_iter(count=1000))
    finally:
        client.close()


def resyncs(worker: WorkerProcess) -> float:
    """The full resyncs the worker has run (its metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith("ipam_worker_resync_total "))


def test_a_dual_stack_prefix_node_hands_out_ipv6_from_its_80_without_writing_it_out(cloud: Cloud) -> None:
    node, instance_id, subnet = dual_stack_node(cloud)
    with WorkerProcess(
        cloud.redis_url, cloud.allocator.address, cloud.moto.endpoint_url, resync_interval_seconds=1
    ) as worker:
        poll(lambda: pool_prefix(cloud, node) != "" and cloud.api.stats(node).available_ips >= 16, timeout=30)
        prefix = pool_prefix(cloud, node)
        # One /80 on the primary interface, inside its subnet's /64; no IPv6 address one by one.
        assert ipv6_prefixes(cloud, instance_id) == [[prefix]]
        assert ipaddress.IPv6Network(prefix).prefixlen == 80 and ipaddress.IPv6Network(prefix).subnet_of(subnet)
        assert [i.get("Ipv6Addresses", []) for i in cloud.interfaces(instance_id)] == [[]]
        assert len(cloud.prefixes(instance_id)) == 1  # IPv4 beside it in a /28
        stats = cloud.api.stats(node)
        assert (stats.needed_ipv6, stats.excess_ipv6, stats.deficit_reason) == (0, 0, "")

        before = redis_bytes(cloud)
        handed: set[str] = set()
        for i in range(12):
            reply = cloud.api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node, owner=f"pod-{i}", wait_for_refill=True), timeout=30
            )
            v6 = reply.ipv6
            assert ipaddress.ip_address(v6.ip) in ipaddress.IPv6Network(prefix)
            assert (v6.subnet_cidr, v6.gateway_ip) == (str(subnet), GATEWAY)
            assert ipaddress.ip_address(reply.ipv4.ip) in ipaddress.ip_network(cloud.prefixes(instance_id)[0])
            handed.add(v6.ip)
        assert len(handed) == 12
        # The /80's addresses stay the pool's: EC2 never lists them, and the worker's next look at the
        # node (a resync) neither drops them nor marks them lost.
        seen = resyncs(worker)
        poll(lambda: resyncs(worker) >= seen + 2, timeout=30)  # one begun after the last allocation
        assert cloud.api.stats(node).lost_ips == 0
        assert set(cloud.api.dump(node)[1]) == handed
        # Redis grows with the addresses handed out (12 of each family), never with the 2^48 of the /80.
        assert redis_bytes(cloud) - before < 12 * 1500
        assert ipv6_prefixes(cloud, instance_id) == [[prefix]]  # never released while the node lives
        assert worker.stop() == 0, worker.log_text()[-3000:]


def test_an_ambiguous_assign_is_read_back_and_a_80_removed_out_of_band_is_replaced(
    cloud: Cloud, maintainer: Maintainer
) -> None:
    node, instance_id, _ = dual_stack_node(cloud)
    assigns = record_requests(maintainer.client, "AssignIpv6Addresses")
    fault = Ec2FaultAfterCall(maintainer.client, "AssignIpv6Addresses")  # carried out, answered 500
    maintainer.maintain(node)
    assert fault.injected == 1 and len(assigns) == 1  # read back, found: not asked again
    ((first,),) = ipv6_prefixes(cloud, instance_id)
    assert pool_prefix(cloud, node) == first

    taken = [
        cloud.api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner=f"pod-{i}"), timeout=5).ipv6.ip
        for i in range(2)
    ]
    for _ in range(3):  # nothing more for IPv6 while the node holds its /80
        maintainer.maintain(node)
    assert len(assigns) == 1

    eth0 = cloud.interfaces(instance_id)[0]["NetworkInterfaceId"]
    cloud.ec2.unassign_ipv6_addresses(NetworkInterfaceId=eth0, Ipv6Prefixes=[first])
    # Another interface takes it meanwhile: the node's next /80 is another one.
    other = cloud.ec2.create_network_interface(SubnetId=cloud.interfaces(instance_id)[0]["SubnetId"])
    cloud.ec2.assign_ipv6_addresses(
        NetworkInterfaceId=other["NetworkInterface"]["NetworkInterfaceId"], Ipv6Prefixes=[first]
    )
    maintainer.forget(instance_id)  # as the resync's read of the VPC finds it
    maintainer.maintain(node)
    # Its allocated addresses stay their owners', marked lost; a new /80 takes its place.
    assert cloud.api.stats(node).lost_ips == 2
    assert set(cloud.api.dump(node)[1]) == set(taken)
    ((second,),) = ipv6_prefixes(cloud, instance_id)
    assert second != first and pool_prefix(cloud, node) == second
    reply = cloud.api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="pod-after"), timeout=5)
    assert ipaddress.ip_address(reply.ipv6.ip) in ipaddress.IPv6Network(second)


def test_callers_waiting_on_an_empty_prefix_node_are_served_by_prefixes(cloud: Cloud) -> None:
    """20 callers wait at once on a prefix node with nothing free and no watermark: the worker counts
    them into the deficit and meets it with two prefixes; each caller gets an address of one."""
    vpc = cloud.vpc(24)
    node, instance_id = cloud.node(vpc, pre_allocate=0, pre_allocate_set=True)
    with WorkerProcess(cloud.redis_url, cloud.allocator.address, cloud.moto.endpoint_url) as worker:
        with ThreadPoolExecutor(20) as pool:
            handed = list(pool.map(lambda i: cloud.allocate(node, f"pod-{i}", wait=True).ip, range(20)))
        prefixes = [ipaddress.ip_network(p) for p in cloud.prefixes(instance_id)]
        assert len(set(handed)) == 20 and all(any(ipaddress.ip_address(ip) in p for p in prefixes) for ip in handed)
        assert cloud.secondaries(instance_id) == []
        # ⌈20 / 16⌉: callers the free addresses already cover are not asked for again.
        assert len(prefixes) == 2, prefixes
        assert worker.stop() == 0, worker.log_text()[-3000:]
