"""The cloud view at cluster scale, through the real worker: a full resync costs a number of EC2
calls that does not grow with the nodes, a burst of refills reads (almost) nothing, and a change
made behind the worker's back is caught at the next refresh. Counted from the worker's metrics."""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from botocore.client import BaseClient
from prometheus_client.parser import text_string_to_metric_families

from dev.demo_seed import DEMO_IMAGE_ID, DemoNetwork, create_demo_network
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker.providers.aws import is_read
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import MotoServer, ec2_client
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

RESYNC_S = 3


def scrape(worker: WorkerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample the worker exports, by name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def calls(worker: WorkerProcess) -> Counter[str]:
    """EC2 calls so far by operation, as the worker counts them."""
    samples = scrape(worker).get("ipam_worker_cloud_calls_total", [])
    counted: Counter[str] = Counter()
    for labels, value in samples:
        counted[labels["operation"]] += int(value)
    return counted


def resyncs(worker: WorkerProcess) -> int:
    return int(sum(v for _, v in scrape(worker).get("ipam_worker_resync_total", [])))


@dataclass
class Cluster:
    api: Api
    ec2: BaseClient
    network: DemoNetwork
    worker: WorkerProcess

    def one_resync(self) -> Counter[str]:
        """The EC2 calls of one full resync (from its start to the next one's)."""
        running = resyncs(self.worker)
        poll(lambda: resyncs(self.worker) > running, timeout=60)  # the one under way when asked ends
        before, at = calls(self.worker), resyncs(self.worker)
        poll(lambda: resyncs(self.worker) > at, timeout=60)
        return calls(self.worker) - before


@pytest.fixture
def cluster_of(moto_server: MotoServer) -> Iterator[object]:
    opened: list[object] = []

    def start(nodes: int, *, pre_allocate: int = 2, **worker: object) -> Cluster:
        ec2 = ec2_client(moto_server.endpoint_url)
        network = create_demo_network(ec2, instance_types=())  # a VPC of its own: its interfaces alone
        reply = ec2.run_instances(
            ImageId=DEMO_IMAGE_ID,
            MinCount=nodes,
            MaxCount=nodes,
            InstanceType="m5.large",
            SubnetId=network.subnet_ids[0],
            SecurityGroupIds=[network.security_group_id],
            Placement={"AvailabilityZone": network.availability_zone},
        )
        redis = RedisServer().start()
        allocator = AllocatorProcess(redis.url).start()
        opened.extend([redis, allocator])
        api = Api(allocator.address)
        for instance in reply["Instances"]:
            api.create_node(instance_id=instance["InstanceId"], instance_type="m5.large", pre_allocate=pre_allocate)
        process = WorkerProcess(
            redis.url,
            allocator.address,
            moto_server.endpoint_url,
            ec2_qps=1000,
            ec2_burst=1000,
            resync_interval_seconds=RESYNC_S,
            **worker,
        ).start()
        opened.append(process)
        cluster = Cluster(api, ec2, network, process)
        try:
            poll(lambda: all(n.stats.needed_ips == 0 for n in _nodes(api)), timeout=120)
        except AssertionError:
            raise AssertionError(process.log_tail(40)) from None
        return cluster

    yield start
    for thing in reversed(opened):
        if isinstance(thing, WorkerProcess):
            assert thing.stop() == 0, thing.log_tail()
        else:
            thing.close() if isinstance(thing, RedisServer) else thing.stop()  # type: ignore[attr-defined]


def _nodes(api: Api) -> list[npb.Node]:
    """Every node (following the pages, when the reply is paged)."""
    nodes, request = [], npb.ListNodesRequest()
    while True:
        reply = api.nodes.ListNodes(request, timeout=10)
        nodes += list(reply.nodes)
        token = getattr(reply, "next_page_token", "")
        if not token:
            return nodes
        request = npb.ListNodesRequest(page_token=token)


def test_a_full_resync_costs_the_same_ec2_calls_for_20_and_for_200_nodes(cluster_of) -> None:  # type: ignore[no-untyped-def]
    costs = {}
    for nodes in (20, 200):
        # Seeding 200 nodes with the subnet read after each assignment would read 200 interfaces 200
        # times; the view's own check is enough here.
        cluster = cluster_of(nodes, check_address_conflicts=False)
        costs[nodes] = cluster.one_resync()
        assert all(n.stats.available_ips == 2 for n in _nodes(cluster.api))
    # Interfaces of the VPC, its subnets, CIDRs and security groups: one page each at these sizes.
    assert costs[20] == costs[200], costs
    assert sum(costs[200].values()) <= 6, costs
    assert not any(op.startswith(("Assign", "Unassign", "Create", "Attach")) for op in costs[200])


def test_a_burst_of_refills_reads_less_than_once_per_ten_mutating_calls(cluster_of) -> None:  # type: ignore[no-untyped-def]
    # As on AWS: conflicts checked against the view only (the local EC2's duplicates are in it).
    cluster = cluster_of(10, pre_allocate=4, check_address_conflicts=False)
    cluster.one_resync()  # the view now holds every node
    before = calls(cluster.worker)
    nodes = _nodes(cluster.api)
    for node in nodes:
        for i in range(4):
            cluster.api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node.spec.name, family=pb.FAMILY_IPV4, owner=f"pod-{i}"), timeout=10
            )
    try:
        poll(lambda: all(n.stats.needed_ips == 0 and n.stats.used_ips == 4 for n in _nodes(cluster.api)), timeout=60)
    except AssertionError:
        raise AssertionError(str([n.stats for n in _nodes(cluster.api)])) from None
    spent = calls(cluster.worker) - before
    mutating = sum(v for op, v in spent.items() if not is_read(op))
    reads = sum(v for op, v in spent.items() if is_read(op))
    assert mutating >= 10, spent
    # The resyncs that ran meanwhile read the VPC a few times: counted too, and still below 0.1.
    assert reads < 0.1 * mutating + 4 * (1 + resyncs(cluster.worker)), spent


def test_an_address_unassigned_behind_the_workers_back_leaves_the_pool_at_the_next_refresh(cluster_of) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_of(2, pre_allocate=4)
    node = _nodes(cluster.api)[0]
    dump = cluster.api.admin_alloc.Dump(pb.DumpRequest(node=node.spec.name), timeout=5)
    taken = sorted(dump.free_ipv4)[0]
    interface = node.interfaces[0].id
    cluster.ec2.unassign_private_ip_addresses(NetworkInterfaceId=interface, PrivateIpAddresses=[taken])

    def pool() -> set[str]:
        d = cluster.api.admin_alloc.Dump(pb.DumpRequest(node=node.spec.name), timeout=5)
        return set(d.ipv4) | set(d.free_ipv4)

    poll(lambda: taken not in pool() and len(pool()) == 4, timeout=30)
    handed_out = {
        cluster.api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node.spec.name, family=pb.FAMILY_IPV4, owner=f"pod-{i}"), timeout=10
        ).ipv4.ip
        for i in range(4)
    }
    # Read after the calls: the first one's refill may add addresses that the later ones hand out.
    held_by_ec2 = {
        a["PrivateIpAddress"]
        for i in cluster.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [node.spec.instance_id]}]
        )["NetworkInterfaces"]
        for a in i["PrivateIpAddresses"]
    }
    assert handed_out <= held_by_ec2
