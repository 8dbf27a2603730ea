"""The AWS provider against a real moto server over HTTP; EC2 faults injected with botocore hooks."""

from __future__ import annotations

import ipaddress
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from botocore.awsrequest import AWSResponse
from botocore.client import BaseClient
from prometheus_client import CollectorRegistry

from services.cloudworker.metrics import CloudMetrics
from services.cloudworker.model import InstanceLimits, NetworkInterface
from services.cloudworker.providers.aws import (
    AWS_IPV6_GATEWAY,
    CLUSTER_TAG,
    CREATED_AT_TAG,
    MANAGED_BY_TAG,
    NODE_TAG,
    AwsProvider,
    RetryPolicy,
    build_aws_provider,
)
from services.cloudworker.providers.errors import (
    LimitExceeded,
    NotFound,
    ProviderError,
    SubnetFull,
    Throttled,
    Transient,
)
from services.cloudworker.ratelimit import TokenBucket
from services.core.family import Family
from tests.support.moto_server import (
    DUMMY_KEY,
    POD_SUBNET_TAGS,
    REGION,
    DemoNetwork,
    Ec2Fault,
    MotoServer,
    ec2_client,
    record_requests,
    run_instance,
)

_clusters = itertools.count()


class WallClock:
    """Wall time the test can move (for the created-at tag and the leak grace period)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    provider: AwsProvider
    ec2: BaseClient  # the provider's client: faults registered on it hit the provider
    limiter: TokenBucket
    registry: CollectorRegistry
    backoffs: list[float]  # the delays the provider slept between retries
    clock: WallClock
    network: DemoNetwork

    def attempts(self, operation: str, response_code: str) -> int:
        """EC2 attempts of `operation` that ended with `response_code`, as the metrics counted them."""
        value = self.registry.get_sample_value(
            "ipam_worker_cloud_api_duration_seconds_count",
            {"provider": "aws", "operation": operation, "response_code": response_code},
        )
        return int(value or 0)

    def create(self, instance_id: str, *, ipv4: int = 0, device_index: int = 1) -> NetworkInterface:
        return self.provider.create_interface(
            instance_id=instance_id,
            node="node-a",
            subnet_id=self.network.subnet_ids[1],
            security_group_ids=[self.network.security_group_id],
            device_index=device_index,
            ipv4_count=ipv4,
        )

    def raw_interface(self, interface_id: str) -> dict:
        return self.ec2.describe_network_interfaces(NetworkInterfaceIds=[interface_id])["NetworkInterfaces"][0]


@pytest.fixture
def harness(moto_server: MotoServer, demo_network: DemoNetwork) -> Harness:
    """A provider with its own client (hooks die with the test), cluster name, bucket and metrics."""
    ec2 = ec2_client(moto_server.endpoint_url)
    registry = CollectorRegistry()
    backoffs: list[float] = []
    clock = WallClock()
    limiter = TokenBucket(qps=1000, burst=1000)  # never waits here; counts the calls
    provider = AwsProvider(
        ec2,
        cluster=f"test-{next(_clusters)}",
        limiter=limiter,
        retry=RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=1.0),
        observer=CloudMetrics(registry).observer("aws"),
        sleep=backoffs.append,
        clock=clock,
    )
    return Harness(provider, ec2, limiter, registry, backoffs, clock, demo_network)


@pytest.fixture
def instance(harness: Harness) -> str:
    """A fresh m5.large of the demo network (interfaces created by one test stay out of the next)."""
    return run_instance(harness.ec2, harness.network, "m5.large")


# --- reading ------------------------------------------------------------------------------------


def test_instance_limits_come_from_describe_instance_types_and_are_cached(harness: Harness) -> None:
    assert harness.provider.instance_limits("m5.large") == InstanceLimits(3, 10, 10, prefix_capable=True)
    assert harness.provider.instance_limits("c5.xlarge") == InstanceLimits(4, 15, 15, prefix_capable=True)
    assert harness.provider.instance_limits("m5.large").capacity() == 27
    assert harness.attempts("DescribeInstanceTypes", "OK") == 2
    assert harness.limiter.taken == 2
    assert not harness.provider.instance_limits("c4.large").prefix_capable  # Xen: no prefixes


def test_nodes_of_one_type_asking_its_limits_at_once_cost_one_describe(harness: Harness) -> None:
    """A resync's first visits ask for one type's limits together (it cost one call each)."""
    harness.ec2.meta.events.register(
        "before-send.ec2.DescribeInstanceTypes",
        lambda **_: time.sleep(0.3),  # the first still in flight
    )
    with ThreadPoolExecutor(4) as pool:
        limits = list(pool.map(harness.provider.instance_limits, ["m5.xlarge"] * 4))
    assert limits == [InstanceLimits(4, 15, 15, prefix_capable=True)] * 4
    assert harness.attempts("DescribeInstanceTypes", "OK") == 1


def test_security_groups_of_a_vpc_come_with_their_tags(harness: Harness) -> None:
    network = harness.network
    client = harness.ec2
    tagged = client.create_security_group(GroupName=f"tagged-{time.time_ns()}", Description="t", VpcId=network.vpc_id)
    client.create_tags(Resources=[tagged["GroupId"]], Tags=[{"Key": "role", "Value": "pods"}])
    elsewhere = client.create_vpc(CidrBlock="10.200.0.0/16")["Vpc"]["VpcId"]
    other = client.create_security_group(GroupName=f"other-{time.time_ns()}", Description="t", VpcId=elsewhere)

    groups = {g.id: g for g in harness.provider.list_security_groups(network.vpc_id)}
    assert groups[tagged["GroupId"]].tags == {"role": "pods"}
    assert groups[tagged["GroupId"]].vpc_id == network.vpc_id
    assert network.security_group_id in groups
    assert other["GroupId"] not in groups


def test_unknown_instance_type_is_a_clear_error_not_zero_limits(harness: Harness) -> None:
    with pytest.raises(NotFound, match="unknown instance type 'zz.huge'"):
        harness.provider.instance_limits("zz.huge")


def test_describe_instance_subnets_and_vpc_cidrs(harness: Harness, instance: str) -> None:
    network = harness.network
    described = harness.provider.describe_instance(instance)
    assert (described.instance_type, described.availability_zone, described.vpc_id, described.subnet_id) == (
        "m5.large",
        network.availability_zone,
        network.vpc_id,
        network.subnet_ids[0],
    )
    assert described.security_group_ids == (network.security_group_id,)

    subnets = {s.id: s for s in harness.provider.list_subnets(network.vpc_id, network.availability_zone)}
    assert set(subnets) == set(network.subnet_ids)
    assert all(s.free_addresses > 15000 and s.cidr.endswith("/18") for s in subnets.values())
    assert subnets[network.subnet_ids[1]].tags.items() >= POD_SUBNET_TAGS.items()
    assert not subnets[network.subnet_ids[0]].tags.items() >= POD_SUBNET_TAGS.items()

    assert harness.provider.vpc_cidrs(network.vpc_id) == [network.cidr, network.ipv6_cidr]


def test_an_interface_knows_its_subnet_per_family_and_the_vpc_routers_ipv6_address(
    harness: Harness, instance: str
) -> None:
    (primary,) = harness.provider.list_interfaces(instance)
    (subnet,) = harness.ec2.describe_subnets(SubnetIds=[primary.subnet_id])["Subnets"]
    (block,) = subnet["Ipv6CidrBlockAssociationSet"]
    assert (primary.subnet_cidr, primary.gateway_ip) == (
        subnet["CidrBlock"],
        str(ipaddress.ip_network(subnet["CidrBlock"])[1]),
    )
    assert (primary.subnet_ipv6_cidr, primary.gateway_ipv6) == (block["Ipv6CidrBlock"], AWS_IPV6_GATEWAY)
    assert ipaddress.ip_network(primary.subnet_ipv6_cidr).subnet_of(ipaddress.ip_network(harness.network.ipv6_cidr))
    subnets = harness.provider.list_subnets(harness.network.vpc_id)
    assert {s.id: s.ipv6_cidr for s in subnets}[primary.subnet_id] == block["Ipv6CidrBlock"]


def test_build_aws_provider_reaches_the_endpoint(moto_server: MotoServer) -> None:
    provider = build_aws_provider(
        cluster="c",
        region=REGION,
        endpoint_url=moto_server.endpoint_url,
        access_key_id=DUMMY_KEY,
        secret_access_key=DUMMY_KEY,
    )
    assert provider.instance_limits("c5.xlarge").ipv4_per_interface == 15
    assert (provider.limiter.qps, provider.limiter.burst) == (4.0, 20)


def test_the_ipv6_gateway_given_is_the_one_each_dual_stack_interface_carries(
    moto_server: MotoServer, demo_network: DemoNetwork
) -> None:
    provider = build_aws_provider(
        cluster="c",
        region=REGION,
        endpoint_url=moto_server.endpoint_url,
        access_key_id=DUMMY_KEY,
        secret_access_key=DUMMY_KEY,
        ipv6_gateway="fe80::1",
    )
    instance = run_instance(ec2_client(moto_server.endpoint_url), demo_network, "m5.large")
    (primary,) = provider.list_interfaces(instance)
    assert primary.subnet_ipv6_cidr and primary.gateway_ipv6 == "fe80::1"


# --- creating interfaces ------------------------------------------------------------------------


def test_create_interface_with_addresses_tags_and_attachment(harness: Harness, instance: str) -> None:
    modifications = record_requests(harness.ec2, "ModifyNetworkInterfaceAttribute")
    creations = record_requests(harness.ec2, "CreateNetworkInterface")
    created = harness.create(instance, ipv4=4, device_index=1)

    subnet_cidr = ipaddress.ip_network(created.subnet_cidr)
    assert created.device_index == 1 and created.status == "in-use"
    assert created.subnet_id == harness.network.subnet_ids[1]
    assert len(created.ipv4) == 4
    assert all(ipaddress.ip_address(ip) in subnet_cidr for ip in (created.primary_ip, *created.ipv4))
    assert created.gateway_ip == str(subnet_cidr.network_address + 1)
    assert created.security_group_ids == (harness.network.security_group_id,)
    assert created.tags == {
        MANAGED_BY_TAG: "ipam",
        CLUSTER_TAG: harness.provider.cluster,
        NODE_TAG: "node-a",
        CREATED_AT_TAG: str(int(harness.clock.now)),
    }
    # The addresses were asked for in the create call itself, not assigned afterwards.
    assert [c["SecondaryPrivateIpAddressCount"] for c in creations] == [4]
    assert harness.attempts("AssignPrivateIpAddresses", "OK") == 0

    raw = harness.raw_interface(created.id)
    assert raw["Description"] == f"ipam ({instance})"
    assert raw["Attachment"]["InstanceId"] == instance
    # moto ignores DeleteOnTermination, so check that it was requested.
    assert len(modifications) == 1
    assert modifications[0]["NetworkInterfaceId"] == created.id
    assert modifications[0]["Attachment.AttachmentId"] == raw["Attachment"]["AttachmentId"]
    assert modifications[0]["Attachment.DeleteOnTermination"] == "true"

    listed = harness.provider.list_interfaces(instance)
    assert [i.device_index for i in listed] == [0, 1]
    assert listed[1] == created


def test_failed_attach_deletes_the_new_interface(harness: Harness, instance: str) -> None:
    Ec2Fault(harness.ec2, "AttachNetworkInterface", "InvalidParameterValue")
    with pytest.raises(ProviderError) as raised:
        harness.create(instance, ipv4=2)
    assert raised.value.code == "InvalidParameterValue"
    assert type(raised.value) is ProviderError
    assert harness.attempts("DeleteNetworkInterface", "OK") == 1
    left = harness.ec2.describe_network_interfaces(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [harness.provider.cluster]}]
    )["NetworkInterfaces"]
    assert left == []


def test_an_attach_at_a_taken_device_index_is_a_stale_view_and_deletes_the_new_interface(
    harness: Harness, instance: str
) -> None:
    # EC2 has no error code of its own for it; moto does not check device indexes at all.
    message = f"Instance '{instance}' already has an interface attached at device index '1'."
    Ec2Fault(harness.ec2, "AttachNetworkInterface", "InvalidParameterValue", message=message)
    with pytest.raises(LimitExceeded) as raised:
        harness.create(instance, ipv4=2)
    assert raised.value.code == "InvalidParameterValue" and "device index '1'" in raised.value.message
    assert harness.attempts("DeleteNetworkInterface", "OK") == 1
    assert [i.device_index for i in harness.provider.list_interfaces(instance)] == [0]


def test_subnet_full_on_create_is_mapped_and_not_retried(harness: Harness, instance: str) -> None:
    Ec2Fault(harness.ec2, "CreateNetworkInterface", "InsufficientFreeAddressesInSubnet")
    with pytest.raises(SubnetFull):
        harness.create(instance, ipv4=2)
    assert harness.backoffs == []
    assert harness.attempts("CreateNetworkInterface", "InsufficientFreeAddressesInSubnet") == 1
    assert [i.device_index for i in harness.provider.list_interfaces(instance)] == [0]


# --- assigning and unassigning ------------------------------------------------------------------


def test_assign_and_unassign_ipv4_return_what_the_cloud_holds(harness: Harness, instance: str) -> None:
    interface = harness.create(instance)
    assert interface.ipv4 == ()

    added = harness.provider.assign_addresses(interface.id, 3)
    assert len(added.addresses) == 3
    assert set(added.addresses) == set(added.interface.ipv4)
    raw = harness.raw_interface(interface.id)
    assert {a["PrivateIpAddress"] for a in raw["PrivateIpAddresses"] if not a["Primary"]} == set(added.addresses)

    removed = harness.provider.unassign_addresses(interface.id, added.addresses[:2])
    assert removed.addresses == added.addresses[:2]
    assert removed.interface.ipv4 == added.addresses[2:]
    raw = harness.raw_interface(interface.id)
    assert [a["PrivateIpAddress"] for a in raw["PrivateIpAddresses"] if not a["Primary"]] == [added.addresses[2]]


def test_assign_ipv6_returns_only_the_new_addresses(harness: Harness, instance: str) -> None:
    interface = harness.provider.assign_addresses(harness.create(instance, ipv4=1).id, 2, Family.IPV6).interface
    assert len(interface.ipv6) == 2

    added = harness.provider.assign_addresses(interface.id, 1, Family.IPV6)  # moto answers with all 3
    assert len(added.addresses) == 1
    assert added.addresses[0] not in interface.ipv6
    assert set(added.interface.ipv6) == {*interface.ipv6, *added.addresses}
    assert ipaddress.ip_address(added.addresses[0]) in ipaddress.ip_network(harness.network.ipv6_cidr)

    removed = harness.provider.unassign_addresses(interface.id, [interface.ipv6[0], *added.addresses])
    assert set(removed.addresses) == {interface.ipv6[0], added.addresses[0]}
    assert removed.interface.ipv6 == interface.ipv6[1:]
    assert removed.interface.ipv4 == interface.ipv4


def test_unknown_interface_is_not_found(harness: Harness) -> None:
    with pytest.raises(NotFound):
        harness.provider.assign_addresses("eni-0123456789abcdef0", 1)


# --- faults, retries, rate limit ----------------------------------------------------------------


@pytest.mark.parametrize("code", ["RequestLimitExceeded", "Client.RequestLimitExceeded", "Throttling"])
def test_throttling_twice_then_success_backs_off_through_the_bucket(harness: Harness, instance: str, code: str) -> None:
    interface = harness.create(instance)
    fault = Ec2Fault(harness.ec2, "AssignPrivateIpAddresses", code, times=2, status=503)
    taken = harness.limiter.taken

    added = harness.provider.assign_addresses(interface.id, 2)

    assert len(added.addresses) == 2 and set(added.interface.ipv4) == set(added.addresses)
    assert fault.injected == 2
    assert harness.backoffs == [0.1, 0.2]
    assert harness.attempts("AssignPrivateIpAddresses", code) == 2
    assert harness.attempts("AssignPrivateIpAddresses", "OK") == 1
    # Describe before, three assign attempts, each taking a token; the answer names the new
    # addresses, so no Describe after.
    assert harness.limiter.taken - taken == 4


def test_throttling_gives_up_after_the_bounded_attempts(harness: Harness, instance: str) -> None:
    interface = harness.create(instance)
    Ec2Fault(harness.ec2, "AssignPrivateIpAddresses", "RequestLimitExceeded", times=100, status=503)
    with pytest.raises(Throttled):
        harness.provider.assign_addresses(interface.id, 2)
    assert harness.attempts("AssignPrivateIpAddresses", "RequestLimitExceeded") == 3
    assert harness.backoffs == [0.1, 0.2]
    assert harness.raw_interface(interface.id)["PrivateIpAddresses"] == [
        {"Primary": True, "PrivateIpAddress": interface.primary_ip}
    ]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("InsufficientFreeAddressesInSubnet", SubnetFull),
        ("InsufficientCidrBlocks", SubnetFull),
        ("PrivateIpAddressLimitExceeded", LimitExceeded),
    ],
)
def test_assign_errors_are_mapped_and_not_retried(
    harness: Harness, instance: str, code: str, expected: type[ProviderError]
) -> None:
    interface = harness.create(instance)
    Ec2Fault(harness.ec2, "AssignPrivateIpAddresses", code)
    with pytest.raises(expected) as raised:
        harness.provider.assign_addresses(interface.id, 2)
    assert (raised.value.code, raised.value.operation) == (code, "AssignPrivateIpAddresses")
    assert harness.backoffs == []


def test_transient_failure_is_retried_for_a_read_only(harness: Harness, instance: str) -> None:
    Ec2Fault(harness.ec2, "DescribeNetworkInterfaces", "InternalError", status=500)
    assert [i.device_index for i in harness.provider.list_interfaces(instance)] == [0]
    assert harness.backoffs == [0.1]

    interface = harness.create(instance)
    Ec2Fault(harness.ec2, "AssignPrivateIpAddresses", "InternalError", status=500)
    with pytest.raises(Transient):
        harness.provider.assign_addresses(interface.id, 1)  # may have happened: the caller re-reads
    assert harness.backoffs == [0.1]


def test_describe_pages_are_followed_each_through_the_bucket(harness: Harness, instance: str) -> None:
    """moto never paginates, so a hook serves an empty first page with a NextToken."""
    requests = record_requests(harness.ec2, "DescribeNetworkInterfaces")

    def first_page(params: dict, **_: object) -> object:
        if "NextToken" in params["body"]:
            return None
        return AWSResponse("", 200, {}, None), {"NetworkInterfaces": [], "NextToken": "page-2"}

    harness.ec2.meta.events.register("before-call.ec2.DescribeNetworkInterfaces", first_page)
    taken = harness.limiter.taken

    interfaces = harness.provider.list_interfaces(instance)

    assert [i.device_index for i in interfaces] == [0]
    assert [r.get("NextToken") for r in requests] == [None, "page-2"]
    assert harness.attempts("DescribeNetworkInterfaces", "OK") == 2
    assert harness.limiter.taken - taken == 3  # two pages, and the subnet CIDR lookup


def test_rate_limiter_waits_are_observed_per_operation(moto_server: MotoServer) -> None:
    class FakeMonotonic:
        now = 0.0

        def __call__(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = FakeMonotonic()
    registry = CollectorRegistry()
    provider = AwsProvider(
        ec2_client(moto_server.endpoint_url),
        cluster="c",
        limiter=TokenBucket(qps=10, burst=1, clock=clock, sleep=clock.sleep),
        observer=CloudMetrics(registry).observer("aws"),
    )
    provider.instance_limits("m5.large")
    provider.instance_limits("c5.xlarge")

    def waited(stat: str) -> float | None:
        return registry.get_sample_value(
            f"ipam_worker_cloud_rate_limit_wait_seconds_{stat}",
            {"provider": "aws", "operation": "DescribeInstanceTypes"},
        )

    assert waited("count") == 2
    assert waited("sum") == pytest.approx(0.1)  # the second call waited 1/qps for its token
    assert clock.now == pytest.approx(0.1)


# --- leaked interfaces --------------------------------------------------------------------------


def test_leaked_interfaces_are_ours_detached_and_older_than_the_grace(harness: Harness, instance: str) -> None:
    ec2, now, cluster = harness.ec2, harness.clock.now, harness.provider.cluster

    def detached(tags: dict[str, str]) -> str:
        return ec2.create_network_interface(
            SubnetId=harness.network.subnet_ids[2],
            TagSpecifications=[
                {
                    "ResourceType": "network-interface",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        )["NetworkInterface"]["NetworkInterfaceId"]

    ours = {MANAGED_BY_TAG: "ipam", CLUSTER_TAG: cluster, NODE_TAG: "node-a"}
    old = detached({**ours, CREATED_AT_TAG: str(int(now - 3600))})
    detached({**ours, CREATED_AT_TAG: str(int(now - 60))})  # within the grace: maybe being attached
    detached({**ours})  # no creation time: spared
    detached({CREATED_AT_TAG: str(int(now - 3600))})  # not ours
    detached({**ours, CLUSTER_TAG: "another-cluster", CREATED_AT_TAG: str(int(now - 3600))})
    harness.clock.now = now - 3600
    harness.create(instance)  # ours and old, but attached
    harness.clock.now = now

    assert [i.id for i in harness.provider.list_leaked_interfaces(older_than_seconds=300)] == [old]

    assert harness.provider.delete_interface(old) is True
    assert harness.provider.delete_interface(old) is False
    assert harness.provider.list_leaked_interfaces(older_than_seconds=300) == []
