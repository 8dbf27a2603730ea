"""The worker end to end: real Redis, the real moto server over HTTP, the real allocator."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest
from botocore.client import BaseClient
from prometheus_client import CollectorRegistry

from clients.client import AsyncIpamClient, IpamClient
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker.allocator_grpc import GrpcAllocator
from services.cloudworker.app import Worker, build_worker
from services.cloudworker.maintainer import NodeMaintainer
from services.cloudworker.metrics import WorkerMetrics
from services.cloudworker.providers.aws import (
    CLUSTER_TAG,
    CREATED_AT_TAG,
    MANAGED_BY_TAG,
    MANAGED_BY_VALUE,
    AwsProvider,
    RetryPolicy,
)
from services.cloudworker.ratelimit import TokenBucket
from services.cloudworker.settings import WorkerSettings
from tests.support.allocator_process import ADMIN_TOKEN, CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api, expect_error, reason_of
from tests.support.ec2_fault_proxy import Ec2FaultProxy
from tests.support.moto_server import (
    DemoNetwork,
    Ec2Fault,
    Ec2FaultAfterCall,
    MotoServer,
    ec2_client,
    record_requests,
    run_instance,
)
from tests.support.polling import poll
from tests.support.redis_server import RedisServer, free_port
from tests.support.worker_process import WorkerProcess


@dataclass
class Cloud:
    api: Api
    ec2: BaseClient
    network: DemoNetwork
    allocator: AllocatorProcess
    moto: MotoServer

    def node(self, instance_type: str = "m5.large", **spec: object) -> tuple[str, str]:
        instance_id = run_instance(self.ec2, self.network, instance_type)
        name = self.api.create_node(instance_id=instance_id, instance_type=instance_type, **spec)
        return name, instance_id


def secondaries(ec2: BaseClient, instance_id: str) -> list[str]:
    """Every secondary IPv4 address attached to the instance, as EC2 holds it."""
    reply = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])
    return [
        a["PrivateIpAddress"] for i in reply["NetworkInterfaces"] for a in i["PrivateIpAddresses"] if not a["Primary"]
    ]


def interfaces_of(ec2: BaseClient, instance_id: str) -> list[dict]:  # type: ignore[type-arg]
    reply = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])
    return sorted(reply["NetworkInterfaces"], key=lambda i: i["Attachment"]["DeviceIndex"])


def pool_addresses(api: Api, node: str) -> set[str]:
    """Every IPv4 address of the node's pool: allocated, excluded or free."""
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
    return set(dump.ipv4) | set(dump.free_ipv4)


def pool_matches_ec2(api: Api, ec2: BaseClient, node: str, instance_id: str, count: int) -> bool:
    in_ec2 = secondaries(ec2, instance_id)
    return len(in_ec2) == count and set(in_ec2) == pool_addresses(api, node)


@pytest.fixture(scope="module")
def cloud(moto_server: MotoServer, demo_network: DemoNetwork) -> Iterator[Cloud]:
    """A Redis of the module's own: on the session's, the worker would resync, and take the events
    of, every node the earlier tests left there, all through this module."""
    with RedisServer() as redis:
        allocator = AllocatorProcess(redis.url).start()
        worker = WorkerProcess(
            redis.url,
            allocator.address,
            moto_server.endpoint_url,
            gc_interval_seconds=1,
            leaked_interface_grace_seconds=60,
        ).start()
        api = Api(allocator.address)
        yield Cloud(api, ec2_client(moto_server.endpoint_url), demo_network, allocator, moto_server)
        api.close()
        assert worker.stop() == 0, worker.log_text()[-3000:]
        allocator.stop()


def test_deficit_fills_to_the_watermark_then_to_the_instance_limit(cloud: Cloud) -> None:
    api = cloud.api
    node, instance_id = cloud.node()
    poll(lambda: api.stats(node).available_ips == 8)
    assert len(secondaries(cloud.ec2, instance_id)) == 8

    held = []
    for i in range(27):
        reply = api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"pod-{i}", wait_for_refill=True), timeout=30
        )
        held.append(reply.ipv4.ip)
    with pytest.raises(grpc.RpcError) as info:
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="one-too-many", wait_for_refill=True),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(info.value) == "NODE_AT_CAPACITY"

    # m5.large: 3 interfaces x 10 IPv4, one primary each: 27 usable, all held, EC2 agrees exactly.
    in_ec2 = secondaries(cloud.ec2, instance_id)
    assert len(in_ec2) == len(set(in_ec2)) == 27
    assert set(in_ec2) == set(held) == set(api.dump(node)[0]) == pool_addresses(api, node)
    attached = interfaces_of(cloud.ec2, instance_id)
    assert [i["Attachment"]["DeviceIndex"] for i in attached] == [0, 1, 2]
    stats = api.stats(node)
    assert (stats.used_ips, stats.available_ips, stats.deficit_reason) == (27, 27, "at-capacity")


def test_excess_is_released_down_to_the_watermark_never_an_allocated_address(cloud: Cloud) -> None:
    api = cloud.api
    node, instance_id = cloud.node(release_excess=True)
    poll(lambda: api.stats(node).available_ips == 8)
    owners = [f"batch-{i}" for i in range(16)]
    for owner in owners:
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner, wait_for_refill=True), timeout=30
        )
    poll(lambda: api.stats(node).available_ips >= 24)

    stop = threading.Event()
    violations: list[str] = []

    def churn() -> None:
        serial = 0
        while not stop.is_set():
            owner = f"churn-{serial}"
            serial += 1
            try:
                api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=5)
                api.alloc.Release(pb.ReleaseRequest(node=node, owner=owner), timeout=5)
            except grpc.RpcError:
                pass

    def check() -> None:
        # Dump, EC2, Dump: held by the same owner (each has its own) in both dumps, an address was
        # allocated all along, so EC2 must have held it; one released in between may be gone.
        while not stop.is_set():
            before = api.dump(node)[0]
            attached = set(secondaries(cloud.ec2, instance_id))
            after = api.dump(node)[0]
            violations.extend(sorted(ip for ip, o in before.items() if after.get(ip) == o and ip not in attached))

    threads = [threading.Thread(target=churn), threading.Thread(target=check)]
    for t in threads:
        t.start()
    for owner in owners:
        api.alloc.Release(pb.ReleaseRequest(node=node, owner=owner), timeout=5)
    try:
        poll(lambda: len(secondaries(cloud.ec2, instance_id)) <= 9)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert violations == []
    poll(lambda: pool_matches_ec2(api, cloud.ec2, node, instance_id, 8))
    assert api.stats(node).available_ips == 8


def test_an_unknown_instance_type_fails_callers_at_once_until_the_spec_is_fixed(cloud: Cloud) -> None:
    api = cloud.api
    instance_id = run_instance(cloud.ec2, cloud.network, "m5.large")
    node = api.create_node(instance_id=instance_id, instance_type="zz.huge")  # a type EC2 does not know
    poll(lambda: api.stats(node).deficit_reason == "instance-type-unknown")
    expect_error(  # at once: waiting for a refill would end at the deadline with another reason
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod", wait_for_refill=True),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSTANCE_TYPE_UNKNOWN",
    )

    fixed = npb.NodeSpec(name=node, instance_id=instance_id, instance_type="m5.large")
    api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=fixed), timeout=5)
    # The worker reports the reason cleared after the addresses it added: both are polled for.
    poll(lambda: (api.stats(node).available_ips, api.stats(node).deficit_reason) == (8, ""))
    reply = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod", wait_for_refill=True), timeout=20
    )
    assert reply.ipv4.ip in secondaries(cloud.ec2, instance_id)


def ipv6_in_ec2(ec2: BaseClient, instance_id: str) -> list[str]:
    """Every IPv6 address attached to the instance, as EC2 holds it."""
    return [a["Ipv6Address"] for i in interfaces_of(ec2, instance_id) for a in i.get("Ipv6Addresses", [])]


def test_ipv6_excess_is_released_down_to_the_watermark_never_an_allocated_address(cloud: Cloud) -> None:
    api = cloud.api
    node, instance_id = cloud.node(ipv6_enabled=True, release_excess=True, pre_allocate=2, pre_allocate_set=True)
    poll(lambda: api.stats(node).available_ipv6 == 2)
    owners = [f"v6-{i}" for i in range(6)]
    held = {
        owner: api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner=owner, wait_for_refill=True), timeout=30
        ).ipv6.ip
        for owner in owners
    }
    poll(lambda: api.stats(node).available_ipv6 == 8)  # 6 used, 2 free: the watermark again
    for owner in owners[1:]:
        api.alloc.Release(pb.ReleaseRequest(node=node, owner=owner), timeout=5)

    # 1 used and 7 free, 2 of them the watermark: 5 in excess, given back to EC2.
    def settled() -> bool:
        stats = api.stats(node)
        dump = api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
        in_ec2 = ipv6_in_ec2(cloud.ec2, instance_id)
        return (stats.available_ipv6, stats.used_ipv6, stats.excess_ipv6) == (3, 1, 0) and sorted(in_ec2) == sorted(
            {*dump.ipv6, *dump.free_ipv6}
        )

    poll(settled)
    assert held[owners[0]] in ipv6_in_ec2(cloud.ec2, instance_id)
    assert api.dump(node)[1] == {held[owners[0]]: owners[0]}


def test_each_family_of_a_dual_stack_allocation_carries_its_own_subnet_and_gateway(cloud: Cloud) -> None:
    """Through the Python client: the IPv6 address comes with its subnet's IPv6 block (as EC2 holds
    it) and the VPC router's link-local IPv6 address, the IPv4 one with the IPv4 subnet and router."""
    node, instance_id = cloud.node(ipv6_enabled=True, pre_allocate=2, pre_allocate_set=True)
    with IpamClient(cloud.allocator.address, token=CLIENT_TOKEN, timeout=30) as client:
        reply = client.allocate_next(node, owner="dual", wait_for_refill=True)
    v4, v6 = reply.ipv4, reply.ipv6
    assert v6.ip in ipv6_in_ec2(cloud.ec2, instance_id)
    (interface,) = [i for i in interfaces_of(cloud.ec2, instance_id) if i["NetworkInterfaceId"] == v6.interface_id]
    (subnet,) = cloud.ec2.describe_subnets(SubnetIds=[interface["SubnetId"]])["Subnets"]
    assert [v6.subnet_cidr] == [a["Ipv6CidrBlock"] for a in subnet["Ipv6CidrBlockAssociationSet"]]
    assert ipaddress.ip_address(v6.ip) in ipaddress.ip_network(v6.subnet_cidr)
    assert v6.gateway_ip == "fe80:ec2::1"
    v4_subnet = ipaddress.ip_network(v4.subnet_cidr)
    assert ipaddress.ip_address(v4.ip) in v4_subnet and v4.gateway_ip == str(v4_subnet.network_address + 1)
    # The VPC's CIDRs, one of each family, each holding that family's subnet.
    cidrs = cloud.api.alloc.GetVpcCIDRs(pb.GetVpcCIDRsRequest(node=node), timeout=5).cidrs
    assert list(cidrs) == [cloud.network.cidr, cloud.network.ipv6_cidr] == list(v6.cidrs)
    assert ipaddress.ip_network(v6.subnet_cidr).subnet_of(ipaddress.ip_network(cloud.network.ipv6_cidr))
    # Dump names the same subnets and gateways, per family.
    dump = cloud.api.alloc.Dump(pb.DumpRequest(node=node), timeout=5)
    subnets = {(s.family, s.cidr, s.gateway_ip): set(s.interface_ids) for s in dump.subnets}
    assert v6.interface_id in subnets[(pb.FAMILY_IPV6, v6.subnet_cidr, v6.gateway_ip)]
    assert v4.interface_id in subnets[(pb.FAMILY_IPV4, v4.subnet_cidr, v4.gateway_ip)]
    assert {family for family, _, _ in subnets} == {pb.FAMILY_IPV4, pb.FAMILY_IPV6}


def test_leaked_interface_is_deleted_and_foreign_ones_never(cloud: Cloud) -> None:
    subnet = cloud.network.subnet_ids[1]

    def create(tags: dict[str, str]) -> str:
        spec = [{"ResourceType": "network-interface", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
        return cloud.ec2.create_network_interface(SubnetId=subnet, TagSpecifications=spec)["NetworkInterface"][
            "NetworkInterfaceId"
        ]

    ours = {MANAGED_BY_TAG: MANAGED_BY_VALUE, CLUSTER_TAG: "ipam"}
    leaked = create({**ours, CREATED_AT_TAG: str(int(time.time()) - 3600)})
    young = create({**ours, CREATED_AT_TAG: str(int(time.time()))})
    foreign = create({"team": "someone-else", CREATED_AT_TAG: str(int(time.time()) - 3600)})
    other_cluster = create(
        {MANAGED_BY_TAG: MANAGED_BY_VALUE, CLUSTER_TAG: "another", CREATED_AT_TAG: str(int(time.time()) - 3600)}
    )

    def exists(interface_id: str) -> bool:
        found = cloud.ec2.describe_network_interfaces(
            Filters=[{"Name": "network-interface-id", "Values": [interface_id]}]
        )
        return bool(found["NetworkInterfaces"])

    poll(lambda: not exists(leaked))
    assert exists(young) and exists(foreign) and exists(other_cluster)


def test_new_interfaces_get_the_security_groups_the_tags_select_else_the_primary_s(cloud: Cloud) -> None:
    vpc, label = cloud.network.vpc_id, f"pods-{time.time_ns()}"

    def group(name: str, tags: dict[str, str]) -> str:
        created = cloud.ec2.create_security_group(GroupName=name, Description="test", VpcId=vpc)["GroupId"]
        cloud.ec2.create_tags(Resources=[created], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        return created

    tagged = sorted([group(f"{label}-1", {"ipam-test": label}), group(f"{label}-2", {"ipam-test": label})])
    group(f"{label}-other", {"ipam-test": "someone-else"})

    # pre_allocate 12 > the 9 secondaries eth0 of an m5.large holds: a second interface is created.
    by_tags, by_tags_instance = cloud.node(pre_allocate=12, security_group_tags={"ipam-test": label})
    no_match, no_match_instance = cloud.node(pre_allocate=12, security_group_tags={"ipam-test": "nobody-has-it"})

    def groups_of_device_1(instance_id: str) -> set[str] | None:
        attached = interfaces_of(cloud.ec2, instance_id)
        if len(attached) < 2:
            return None
        # The local EC2 adds the instance's groups to every attached interface (AWS does not): left out.
        return {g["GroupId"] for g in attached[1]["Groups"]} - {cloud.network.security_group_id}

    assert poll(lambda: groups_of_device_1(by_tags_instance)) == set(tagged)
    assert poll(lambda: groups_of_device_1(no_match_instance) is not None)
    assert groups_of_device_1(no_match_instance) == set()  # the primary's: the demo group, and only it
    assert [g["GroupId"] for g in interfaces_of(cloud.ec2, no_match_instance)[1]["Groups"]] == [
        cloud.network.security_group_id
    ]
    poll(lambda: cloud.api.stats(by_tags).available_ips >= 12 and cloud.api.stats(no_match).available_ips >= 12)


def _maintain(
    cloud: Cloud,
    client: BaseClient,
    node: str,
    *,
    stale_reservation_seconds: float = 60,
    settle_reservations: bool = False,
    metrics: WorkerMetrics | None = None,
) -> None:
    """One maintenance of `node` by a worker's maintainer driven here, through `client` (whose
    botocore hooks a test may fault), on a fresh asyncio loop."""

    async def run() -> None:
        provider = AwsProvider(
            client,
            cluster="ipam",
            limiter=TokenBucket(100, 100),
            retry=RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05),
        )
        async with AsyncIpamClient(cloud.allocator.address, token=ADMIN_TOKEN) as allocator:
            maintainer = NodeMaintainer(
                provider,
                GrpcAllocator(allocator),
                metrics or WorkerMetrics(CollectorRegistry()),
                stale_reservation_seconds=stale_reservation_seconds,
            )
            await maintainer.maintain(node, settle_reservations=settle_reservations)

    asyncio.run(run())


@pytest.fixture(scope="module")
def quiet_cloud(moto_server: MotoServer, demo_network: DemoNetwork) -> Iterator[Cloud]:
    """An allocator with no worker consuming its events: the test drives the maintainer itself."""
    with RedisServer() as own_redis, AllocatorProcess(own_redis.url) as allocator:
        api = Api(allocator.address)
        yield Cloud(api, ec2_client(moto_server.endpoint_url), demo_network, allocator, moto_server)
        api.close()


def test_throttling_is_retried_and_a_full_subnet_is_skipped(quiet_cloud: Cloud) -> None:
    """Faults injected at the real boundary: botocore hooks answer in EC2's place."""
    cloud = quiet_cloud
    subnet_a, subnet_b = cloud.network.subnet_ids[1], cloud.network.subnet_ids[2]
    # pre_allocate 12 > the 9 free slots of eth0: the worker must also create an interface.
    node, instance_id = cloud.node(pre_allocate=12, subnet_ids=[subnet_a, subnet_b])
    client = ec2_client(cloud.moto.endpoint_url)
    creations = record_requests(client, "CreateNetworkInterface")
    throttled = Ec2Fault(client, "AssignPrivateIpAddresses", "RequestLimitExceeded", times=2, status=503)
    full = Ec2Fault(client, "CreateNetworkInterface", "InsufficientFreeAddressesInSubnet", times=1)

    _maintain(cloud, client, node)
    assert (throttled.injected, full.injected) == (2, 1)
    assert cloud.api.stats(node).available_ips == 12
    attached = interfaces_of(cloud.ec2, instance_id)
    assert len(attached) == 2
    refused_subnet = creations[0]["SubnetId"]
    assert {refused_subnet, attached[1]["SubnetId"]} == {subnet_a, subnet_b}  # the other subnet was used
    assert set(secondaries(cloud.ec2, instance_id)) == pool_addresses(cloud.api, node)


def test_a_device_index_taken_meanwhile_is_replanned_in_the_same_maintenance(quiet_cloud: Cloud) -> None:
    cloud = quiet_cloud
    node, instance_id = cloud.node(pre_allocate=12)  # more than eth0's 9 free slots: one interface is created
    client = ec2_client(cloud.moto.endpoint_url)
    creations = record_requests(client, "CreateNetworkInterface")
    deletions = record_requests(client, "DeleteNetworkInterface")
    taken = Ec2Fault(
        client,
        "AttachNetworkInterface",
        "InvalidParameterValue",
        message=f"Instance '{instance_id}' already has an interface attached at device index '1'.",
    )

    _maintain(cloud, client, node)  # raised before: the maintenance failed and waited for a redelivery
    assert taken.injected == 1
    assert (len(creations), len(deletions)) == (2, 1)  # the refused interface was deleted, another made
    assert cloud.api.stats(node).available_ips == 12
    assert [i["Attachment"]["DeviceIndex"] for i in interfaces_of(cloud.ec2, instance_id)] == [0, 1]
    assert set(secondaries(cloud.ec2, instance_id)) == pool_addresses(cloud.api, node)


@contextlib.asynccontextmanager
async def _in_process_worker(
    cloud: Cloud, client: BaseClient, cluster: str = "ipam"
) -> AsyncIterator[tuple[Worker, AsyncIpamClient]]:
    """A worker built in this process by the worker's own factory, its EC2 calls through `client`."""
    settings = WorkerSettings(
        redis_url=cloud.allocator.env["IPAM_REDIS_URL"],
        grpc_address=cloud.allocator.address,
        admin_token=ADMIN_TOKEN,
        metrics_address="",
        consumer_group="g",
        consumer_name="c",
        stale_reservation_seconds=60,
    )
    worker = build_worker(settings, provider=AwsProvider(client, cluster=cluster, limiter=TokenBucket(100, 100)))
    try:
        assert isinstance(worker.allocator, GrpcAllocator)
        yield worker, worker.allocator.client
    finally:
        await worker.close()


def test_a_leaked_interface_is_deleted_on_its_second_sighting_only(quiet_cloud: Cloud) -> None:
    """Cilium's mark-then-delete on top of the grace period: an interface of ours detached for a
    moment (moved, re-attached) between two collections survives."""
    cloud = quiet_cloud
    cluster = f"gc-{time.time_ns()}"  # apart from the other workers' collections
    tags = {MANAGED_BY_TAG: MANAGED_BY_VALUE, CLUSTER_TAG: cluster, CREATED_AT_TAG: str(int(time.time()) - 3600)}
    spec = [{"ResourceType": "network-interface", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    interface = cloud.ec2.create_network_interface(SubnetId=cloud.network.subnet_ids[1], TagSpecifications=spec)[
        "NetworkInterface"
    ]["NetworkInterfaceId"]
    instance_id = run_instance(cloud.ec2, cloud.network, "m5.large")

    def exists() -> bool:
        found = cloud.ec2.describe_network_interfaces(Filters=[{"Name": "network-interface-id", "Values": [interface]}])
        return bool(found["NetworkInterfaces"])

    async def scenario() -> list[bool]:
        alive = []
        async with _in_process_worker(cloud, ec2_client(cloud.moto.endpoint_url), cluster) as (worker, _):
            await worker.collect_leaked_interfaces()  # first sighting: marked
            alive.append(exists())
            if not alive[-1]:
                return alive
            attachment = cloud.ec2.attach_network_interface(
                NetworkInterfaceId=interface, InstanceId=instance_id, DeviceIndex=1
            )["AttachmentId"]
            await worker.collect_leaked_interfaces()  # in use now: the mark goes
            alive.append(exists())
            cloud.ec2.detach_network_interface(AttachmentId=attachment)
            await worker.collect_leaked_interfaces()  # detached again: a first sighting again
            alive.append(exists())
            await worker.collect_leaked_interfaces()  # second sighting in a row: deleted
            alive.append(exists())
        return alive

    assert asyncio.run(scenario()) == [True, True, True, False]


def test_work_asked_while_another_task_holds_the_node_is_done_by_the_holder(quiet_cloud: Cloud) -> None:
    """The lost-wake-up race: an event finds the node held by a maintenance that read the node
    before the change; the holder must run again rather than both return with nothing done."""
    cloud = quiet_cloud
    node, _ = cloud.node(pre_allocate=0, pre_allocate_set=True)  # needs nothing yet
    client = ec2_client(cloud.moto.endpoint_url)
    gate, held = threading.Event(), threading.Event()

    def hold_the_first_read(**_: object) -> None:  # in the provider's thread, not the event loop
        if not held.is_set():
            held.set()
            gate.wait(20)

    client.meta.events.register("before-call.ec2.DescribeNetworkInterfaces", hold_the_first_read)

    async def scenario() -> tuple[bool, bool]:
        async with _in_process_worker(cloud, client) as (worker, allocator):
            first = asyncio.create_task(worker.maintain_node(node))
            await asyncio.to_thread(held.wait, 20)  # the first maintenance read the node, then stalls
            spec = npb.NodeSpec(name=node, instance_id=_instance_of(cloud, node), instance_type="m5.large")
            spec.pre_allocate, spec.pre_allocate_set = 4, True
            await allocator.update_node(spec)
            second = await worker.maintain_node(node)  # the node is held: this one leaves it to the holder
            gate.set()
            return await first, second

    first, second = asyncio.run(scenario())
    assert (first, second) == (True, False)
    assert cloud.api.stats(node).available_ips == 4  # the holder ran again and saw the new watermark


def _instance_of(cloud: Cloud, node: str) -> str:
    return cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).spec.instance_id


def test_a_worker_started_before_redis_consumes_once_redis_is_up(
    moto_server: MotoServer, demo_network: DemoNetwork
) -> None:
    ec2 = ec2_client(moto_server.endpoint_url)
    redis_later = RedisServer(port=free_port())
    allocator_port = free_port()
    with WorkerProcess(redis_later.url, f"127.0.0.1:{allocator_port}", moto_server.endpoint_url) as worker:
        # Up, and it found Redis away: the "consuming" line comes before its first try at Redis.
        poll(lambda: "reading events failed" in worker.log_text())
        with redis_later, AllocatorProcess(redis_later.url, port=allocator_port) as allocator:
            api = Api(allocator.address)
            instance_id = run_instance(ec2, demo_network, "m5.large")
            node = api.create_node(instance_id=instance_id, instance_type="m5.large")
            poll(lambda: api.stats(node).available_ips == 8)  # the first resync may do this one
            for i in range(5):  # a deficit now reaches the worker as an event only
                api.alloc.AllocateNext(
                    pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"p{i}"), timeout=5
                )
            poll(lambda: api.stats(node).available_ips == 13)
            assert len(secondaries(ec2, instance_id)) == 13
            api.close()


def test_a_worker_makes_its_consumer_group_again_after_redis_lost_its_data(
    moto_server: MotoServer, demo_network: DemoNetwork
) -> None:
    ec2 = ec2_client(moto_server.endpoint_url)
    with (
        RedisServer() as own_redis,
        AllocatorProcess(own_redis.url) as allocator,
        WorkerProcess(own_redis.url, allocator.address, moto_server.endpoint_url) as worker,
    ):
        api = Api(allocator.address)
        first = api.create_node(instance_id=run_instance(ec2, demo_network, "m5.large"), instance_type="m5.large")
        poll(lambda: api.stats(first).available_ips == 8)
        with own_redis.client() as redis:
            redis.flushall()  # the stream, its consumer group and the pools: gone
        instance_id = run_instance(ec2, demo_network, "m5.large")
        node = api.create_node(instance_id=instance_id, instance_type="m5.large")
        poll(lambda: api.stats(node).available_ips == 8)
        assert "creating it again" in worker.log_text()
        api.close()


def test_a_worker_killed_mid_event_is_replaced_and_nothing_is_assigned_twice(
    moto_server: MotoServer, demo_network: DemoNetwork
) -> None:
    ec2 = ec2_client(moto_server.endpoint_url)
    with (
        RedisServer() as own_redis,
        AllocatorProcess(own_redis.url) as allocator,
        Ec2FaultProxy(moto_server.endpoint_url, seed=1) as proxy,
    ):
        api = Api(allocator.address)
        # The worker is killed between EC2's assignment and its telling the allocator, the most
        # dangerous moment: its assignment is held at the proxy, the worker killed, then the
        # assignment carried out (a slow worker killed once the addresses showed up took 15 s). Its
        # node lock, which the other waits out, has a lease of 2 s instead of 5: it is held by no one else.
        doomed = WorkerProcess(own_redis.url, allocator.address, proxy.endpoint_url, node_lock_seconds=2).start()
        proxy.hold("AssignPrivateIpAddresses")
        instance_id = run_instance(ec2, demo_network, "m5.large")
        node = api.create_node(instance_id=instance_id, instance_type="m5.large")
        poll(lambda: proxy.held == 1, describe=doomed.log_tail)
        doomed.kill()
        proxy.release()
        poll(lambda: secondaries(ec2, instance_id))
        assert api.stats(node).available_ips == 0  # the allocator never heard of them
        with WorkerProcess(own_redis.url, allocator.address, moto_server.endpoint_url) as other:
            poll(lambda: api.stats(node).available_ips >= 8)
            in_ec2 = secondaries(ec2, instance_id)
            assert len(in_ec2) == 8 and set(in_ec2) == pool_addresses(api, node)
            assert "found in the cloud, added to the pool" in other.log_text()
        api.close()


def test_events_pending_across_a_redis_restart_are_not_lost(moto_server: MotoServer, demo_network: DemoNetwork) -> None:
    ec2 = ec2_client(moto_server.endpoint_url)
    with RedisServer(aof=True) as own_redis:
        allocator = AllocatorProcess(own_redis.url).start()
        api = Api(allocator.address)
        nodes = {
            api.create_node(instance_id=i, instance_type="m5.large"): i
            for i in (run_instance(ec2, demo_network, "m5.large") for _ in range(2))
        }
        own_redis.kill()
        own_redis.restart()
        with WorkerProcess(own_redis.url, allocator.address, moto_server.endpoint_url):
            for node, instance_id in nodes.items():
                poll(lambda: api.stats(node).available_ips == 8)  # noqa: B023 - polled right here
                assert len(secondaries(ec2, instance_id)) == 8
        api.close()
        allocator.stop()


def test_a_reservation_left_by_a_crashed_worker_is_settled_against_the_cloud(quiet_cloud: Cloud) -> None:
    cloud = quiet_cloud
    node, instance_id = cloud.node()
    client = ec2_client(cloud.moto.endpoint_url)

    _maintain(cloud, client, node, stale_reservation_seconds=0)
    assert cloud.api.stats(node).available_ips == 8
    # A worker reserved four addresses, unassigned two of them in EC2, and died.
    reserved = cloud.api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=node, count=4), timeout=5)
    interface = interfaces_of(cloud.ec2, instance_id)[0]["NetworkInterfaceId"]
    gone, kept = list(reserved.ips[:2]), list(reserved.ips[2:])
    cloud.ec2.unassign_private_ip_addresses(NetworkInterfaceId=interface, PrivateIpAddresses=gone)

    _maintain(cloud, client, node, stale_reservation_seconds=0, settle_reservations=True)
    node_now = cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert list(node_now.reservations) == []
    pool = pool_addresses(cloud.api, node)
    assert not set(gone) & pool and set(kept) <= pool  # settled: gone ones left, the others came back
    assert node_now.stats.available_ips == 8  # and the two lost were replaced
    assert set(secondaries(cloud.ec2, instance_id)) == pool


def test_addresses_the_table_lists_but_the_pool_lacks_are_added(quiet_cloud: Cloud) -> None:
    """A worker died between assigning and AddAddresses, and a later report of the same interface
    put the addresses into the allocator's interface table: reconciling goes by the pool itself."""
    cloud = quiet_cloud
    node, instance_id = cloud.node()
    client = ec2_client(cloud.moto.endpoint_url)

    _maintain(cloud, client, node)
    eth0 = interfaces_of(cloud.ec2, instance_id)[0]["NetworkInterfaceId"]
    cloud.ec2.assign_private_ip_addresses(NetworkInterfaceId=eth0, SecondaryPrivateIpAddressCount=3)
    listed = secondaries(cloud.ec2, instance_id)
    cloud.api.nodes.SetInterfaces(
        npb.SetInterfacesRequest(node=node, interfaces=[npb.Interface(id=eth0, device_index=0, addresses=listed)]),
        timeout=5,
    )
    assert len(pool_addresses(cloud.api, node)) == 8 < len(listed)

    _maintain(cloud, client, node)
    assert pool_addresses(cloud.api, node) == set(secondaries(cloud.ec2, instance_id))


def test_an_address_on_two_interfaces_of_the_node_is_given_back_from_the_later(quiet_cloud: Cloud) -> None:
    """The local EC2 picks addresses at random; a worker that died before its check can leave one
    address on two interfaces. Reconciling gives the later copy back."""
    cloud = quiet_cloud
    node, instance_id = cloud.node()
    client = ec2_client(cloud.moto.endpoint_url)

    _maintain(cloud, client, node)
    taken = sorted(secondaries(cloud.ec2, instance_id))[0]
    eth0 = interfaces_of(cloud.ec2, instance_id)[0]
    twin = cloud.ec2.create_network_interface(
        SubnetId=eth0["SubnetId"],
        PrivateIpAddresses=[
            {"PrivateIpAddress": "10.0.63.250", "Primary": True},
            {"PrivateIpAddress": taken, "Primary": False},
        ],
    )["NetworkInterface"]["NetworkInterfaceId"]
    cloud.ec2.attach_network_interface(NetworkInterfaceId=twin, InstanceId=instance_id, DeviceIndex=1)
    assert secondaries(cloud.ec2, instance_id).count(taken) == 2

    _maintain(cloud, client, node)
    in_ec2 = secondaries(cloud.ec2, instance_id)
    assert in_ec2.count(taken) == 1
    assert set(in_ec2) == pool_addresses(cloud.api, node) and len(in_ec2) == len(set(in_ec2))


def free_addresses(api: Api, node: str) -> set[str]:
    return set(api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5).free_ipv4)


def _shrink_to(cloud: Cloud, node: str, instance_id: str, pre_allocate: int) -> None:
    spec = npb.NodeSpec(name=node, instance_id=instance_id, instance_type="m5.large", pre_allocate=pre_allocate)
    spec.release_excess = True
    cloud.api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=spec), timeout=5)


def test_an_unassign_ec2_carried_out_but_answered_500_never_returns_its_addresses(quiet_cloud: Cloud) -> None:
    """EC2 removed the addresses, then answered 500: the reservation is settled by what the
    interface holds, so an address EC2 took back is never handed out (Cilium #13412)."""
    cloud = quiet_cloud
    node, instance_id = cloud.node(release_excess=True)
    client = ec2_client(cloud.moto.endpoint_url)
    _maintain(cloud, client, node)
    assert len(free_addresses(cloud.api, node)) == 8
    fault = Ec2FaultAfterCall(client, "UnassignPrivateIpAddresses")
    _shrink_to(cloud, node, instance_id, 2)

    with pytest.raises(Exception, match="InternalError"):
        _maintain(cloud, client, node)
    assert fault.injected == 1
    in_ec2 = set(secondaries(cloud.ec2, instance_id))
    assert len(in_ec2) == 2  # EC2 did unassign six
    assert free_addresses(cloud.api, node) == in_ec2
    assert list(cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).reservations) == []
    got = {
        cloud.api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"o{i}"), timeout=5
        ).ipv4.ip
        for i in range(2)
    }
    assert got == in_ec2


def test_an_unassign_whose_outcome_cannot_be_read_leaves_the_reservation_to_the_resync(quiet_cloud: Cloud) -> None:
    """The unassign went through but was answered 500, and every read again was throttled: nothing
    is known, so the reserved addresses stay out of circulation until the resync settles them."""
    cloud = quiet_cloud
    node, instance_id = cloud.node(release_excess=True)
    client = ec2_client(cloud.moto.endpoint_url)
    _maintain(cloud, client, node)
    throttled = Ec2Fault(client, "DescribeNetworkInterfaces", "RequestLimitExceeded", times=0, status=503)

    def throttle_every_read_from_now(**_: object) -> None:
        throttled.remaining = 100

    client.meta.events.register("after-call.ec2.UnassignPrivateIpAddresses", throttle_every_read_from_now)
    Ec2FaultAfterCall(client, "UnassignPrivateIpAddresses")
    _shrink_to(cloud, node, instance_id, 2)

    with pytest.raises(Exception, match="InternalError"):
        _maintain(cloud, client, node)
    assert throttled.injected >= 5  # the read again, retried
    in_ec2 = set(secondaries(cloud.ec2, instance_id))
    assert len(in_ec2) == 2
    reservations = cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).reservations
    assert len(reservations) == 1 and len(reservations[0].ips) == 6
    assert free_addresses(cloud.api, node) <= in_ec2
    reply = cloud.api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="o"), timeout=5)
    assert reply.ipv4.ip in in_ec2

    _maintain(cloud, ec2_client(cloud.moto.endpoint_url), node, stale_reservation_seconds=0, settle_reservations=True)
    assert list(cloud.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).reservations) == []
    assert pool_addresses(cloud.api, node) == set(secondaries(cloud.ec2, instance_id))


def test_an_allocated_address_gone_from_the_cloud_is_reported_and_never_handed_out_again(quiet_cloud: Cloud) -> None:
    cloud = quiet_cloud
    node, instance_id = cloud.node()
    client = ec2_client(cloud.moto.endpoint_url)
    _maintain(cloud, client, node)
    taken = cloud.api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="victim"), timeout=5
    ).ipv4
    cloud.ec2.unassign_private_ip_addresses(NetworkInterfaceId=taken.interface_id, PrivateIpAddresses=[taken.ip])

    metrics = WorkerMetrics(CollectorRegistry())
    _maintain(cloud, client, node, metrics=metrics)
    _maintain(cloud, client, node, metrics=metrics)  # seen again: counted once
    assert metrics.registry.get_sample_value("ipam_worker_addresses_lost_total") == 1
    stats = cloud.api.stats(node)
    assert stats.lost_ips == 1
    assert cloud.api.dump(node)[0][taken.ip] == "victim"  # its owner is not robbed of it silently

    cloud.api.alloc.Release(pb.ReleaseRequest(node=node, owner="victim"), timeout=5)
    assert taken.ip not in pool_addresses(cloud.api, node)
    assert cloud.api.stats(node).lost_ips == 0
    for i in range(cloud.api.stats(node).available_ips):
        reply = cloud.api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"next-{i}"), timeout=5
        )
        assert reply.ipv4.ip != taken.ip


@pytest.mark.parametrize("operation", ["AssignPrivateIpAddresses", "CreateNetworkInterface"])
def test_an_assignment_ec2_carried_out_but_answered_500_is_found_and_not_repeated(
    quiet_cloud: Cloud, operation: str
) -> None:
    """The addresses were assigned (or the interface created with them) but the answer was a 500:
    the maintenance reads the cloud again and hands the allocator what is there, no more."""
    cloud = quiet_cloud
    node, instance_id = cloud.node(pre_allocate=4 if operation.startswith("Assign") else 12)
    client = ec2_client(cloud.moto.endpoint_url)
    fault = Ec2FaultAfterCall(client, operation)

    _maintain(cloud, client, node)  # raised before: the maintenance failed until a redelivery
    assert fault.injected == 1
    in_ec2 = secondaries(cloud.ec2, instance_id)
    assert set(in_ec2) == pool_addresses(cloud.api, node) and len(in_ec2) == len(set(in_ec2))
    assert cloud.api.stats(node).available_ips == len(in_ec2) >= (4 if operation.startswith("Assign") else 12)


def test_closing_the_worker_closes_its_rate_limiter_s_redis_connections(moto_server: MotoServer) -> None:
    """The provider the factory builds from the settings spends EC2's budget in Redis over a client
    of its own: `Worker.close` closes it too (it was left open)."""
    with RedisServer() as redis_server, redis_server.client() as observer:

        def limiter_connections() -> int:
            return len(observer.client_list()) - 1  # the observer's own left out

        async def scenario() -> tuple[int, int]:
            settings = WorkerSettings(
                redis_url=redis_server.url,
                grpc_address=f"127.0.0.1:{free_port()}",
                metrics_address="",
                ec2_endpoint_url=moto_server.endpoint_url,
            )
            worker = build_worker(settings)
            assert isinstance(worker.provider, AwsProvider)
            await asyncio.to_thread(worker.provider.limiter.acquire, "DescribeVpcs", {"VpcIds": ["vpc-1"]})
            opened = limiter_connections()
            await worker.close()
            return opened, limiter_connections()

        opened, after_close = asyncio.run(scenario())
        assert (opened, after_close) == (1, 0)
