"""The local EC2 (`python -m dev.local_ec2`) hands out addresses and prefixes as EC2 does, seen
through boto3 over HTTP: one address map per subnet, slots, all or nothing, the errors EC2 answers,
IPv6 /80s, CIDR reservations, Nitro only, and a replayed recording giving back the same."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError

from tests.support.moto_server import DEMO_IMAGE_ID, MotoServer, ec2_client


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local_ec2") / "recording.jsonl"


@pytest.fixture(scope="module")
def server(recording: Path) -> Iterator[MotoServer]:
    """One local EC2 for the module, recording: each test works in a VPC of its own."""
    with MotoServer(local_ec2=True, args=["--state-file", str(recording)]) as running:
        yield running


@pytest.fixture(scope="module")
def ec2(server: MotoServer) -> BaseClient:
    return ec2_client(server.endpoint_url)


@dataclass(frozen=True)
class Subnet:
    id: str
    cidr: ipaddress.IPv4Network
    ipv6_cidr: ipaddress.IPv6Network


def make_subnet(ec2: BaseClient, cidr: str = "10.0.1.0/24") -> Subnet:
    """A subnet of a dual-stack VPC, with the first /64 of the VPC's IPv6 block."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]["VpcId"]
    block = ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
    ipv6 = next(ipaddress.IPv6Network(block).subnets(new_prefix=64))
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, Ipv6CidrBlock=str(ipv6))["Subnet"]["SubnetId"]
    return Subnet(subnet, ipaddress.IPv4Network(cidr), ipv6)


def primary_interface(ec2: BaseClient, subnet: Subnet, instance_type: str = "m5.large") -> str:
    """The primary interface of a new instance of `instance_type` in `subnet`."""
    instance = ec2.run_instances(
        ImageId=DEMO_IMAGE_ID, MinCount=1, MaxCount=1, InstanceType=instance_type, SubnetId=subnet.id
    )["Instances"][0]
    return str(instance["NetworkInterfaces"][0]["NetworkInterfaceId"])


def describe(ec2: BaseClient, interface: str) -> dict[str, Any]:
    return ec2.describe_network_interfaces(NetworkInterfaceIds=[interface])["NetworkInterfaces"][0]  # type: ignore[no-any-return]


def prefixes(ec2: BaseClient, interface: str) -> list[str]:
    return [p["Ipv4Prefix"] for p in describe(ec2, interface).get("Ipv4Prefixes", [])]


def addresses(ec2: BaseClient, interface: str) -> list[str]:
    return [a["PrivateIpAddress"] for a in describe(ec2, interface)["PrivateIpAddresses"]]


def interfaces_in(ec2: BaseClient, subnet: Subnet) -> list[dict[str, Any]]:
    filters = [{"Name": "subnet-id", "Values": [subnet.id]}]
    return ec2.describe_network_interfaces(Filters=filters)["NetworkInterfaces"]  # type: ignore[no-any-return]


def available(ec2: BaseClient, subnet: Subnet) -> int:
    return int(ec2.describe_subnets(SubnetIds=[subnet.id])["Subnets"][0]["AvailableIpAddressCount"])


def error_code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def test_prefixes_are_the_lowest_aligned_free_blocks_listed_in_order(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2)
    interface = primary_interface(ec2, subnet)
    assert addresses(ec2, interface) == ["10.0.1.4"]  # the first address EC2 does not keep for itself
    before = available(ec2, subnet)

    answer = ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=2)

    # 10.0.1.0/28 holds the addresses EC2 reserves and the primary: the next two blocks.
    assert answer["AssignedIpv4Prefixes"] == [{"Ipv4Prefix": "10.0.1.16/28"}, {"Ipv4Prefix": "10.0.1.32/28"}]
    assert answer["AssignedPrivateIpAddresses"] == []  # only what is new
    assert prefixes(ec2, interface) == ["10.0.1.16/28", "10.0.1.32/28"]
    assert available(ec2, subnet) == before - 32
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4Prefixes=["10.0.1.224/28"])
    assert prefixes(ec2, interface) == ["10.0.1.16/28", "10.0.1.32/28", "10.0.1.224/28"]  # in assignment order
    for wrong in ("10.0.1.240/28", "10.0.1.40/28", "10.0.1.64/27"):  # the subnet's last address, host bits, not a /28
        with pytest.raises(ClientError) as refused:
            ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4Prefixes=[wrong])
        assert error_code(refused) == "InvalidParameterValue", wrong


def test_single_addresses_never_collide_and_never_land_in_a_prefix(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2, "10.0.1.0/26")  # blocks .0 (reserved, primary), .16, .32, .48 (the last address)
    interface = primary_interface(ec2, subnet)
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=2)
    free = 64 - 5 - 1 - 32

    # An unattached interface has no slot limit: it takes every free address, and none is handed out twice.
    created = ec2.create_network_interface(SubnetId=subnet.id, SecondaryPrivateIpAddressCount=free - 1)
    taken = [a["PrivateIpAddress"] for a in created["NetworkInterface"]["PrivateIpAddresses"]]
    inside = [ipaddress.IPv4Address(a) for a in taken]
    assert len(set(taken)) == free
    assert not [
        a for a in inside if a in ipaddress.IPv4Network("10.0.1.16/28") or a in ipaddress.IPv4Network("10.0.1.32/28")
    ]
    assert not [a for a in inside if int(a) % 64 in (0, 1, 2, 3, 63) or a == ipaddress.IPv4Address("10.0.1.4")]
    assert available(ec2, subnet) == 0

    with pytest.raises(ClientError) as full:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, SecondaryPrivateIpAddressCount=1)
    assert error_code(full) == "InsufficientFreeAddressesInSubnet"
    with pytest.raises(ClientError) as in_prefix:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, PrivateIpAddresses=["10.0.1.20"])
    assert error_code(in_prefix) == "InvalidIPAddress.InUse"


def test_each_prefix_takes_one_slot_of_the_instance_types_limit(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2)
    interface = primary_interface(ec2, subnet, "t3.small")  # 4 addresses per interface

    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=3)
    with pytest.raises(ClientError) as over:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=1)
    assert error_code(over) == "PrivateIpAddressLimitExceeded"
    assert len(prefixes(ec2, interface)) == 3

    ec2.unassign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4Prefixes=prefixes(ec2, interface)[1:])
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, SecondaryPrivateIpAddressCount=1)
    with pytest.raises(ClientError) as with_secondary:  # primary + 1 secondary + 1 prefix: room for one more
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=2)
    assert error_code(with_secondary) == "PrivateIpAddressLimitExceeded"
    assert len(prefixes(ec2, interface)) == 1
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=1)
    assert len(prefixes(ec2, interface)) == 2


def test_too_few_free_blocks_assign_nothing(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2, "10.0.1.0/26")
    interface = primary_interface(ec2, subnet)  # two free blocks: .16 and .32

    with pytest.raises(ClientError) as short:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=3)
    assert error_code(short) == "InsufficientCidrBlocks"
    assert prefixes(ec2, interface) == []

    # One address in each free block: addresses left, but no whole block.
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, PrivateIpAddresses=["10.0.1.17", "10.0.1.40"])
    with pytest.raises(ClientError) as fragmented:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=1)
    assert error_code(fragmented) == "InsufficientCidrBlocks"
    assert prefixes(ec2, interface) == []


def test_the_capacity_error_can_be_the_invalid_parameter_value_variant(ec2: BaseClient, server: MotoServer) -> None:
    interface = primary_interface(ec2, make_subnet(ec2, "10.0.1.0/26"))
    server.configure(prefix_capacity_error="InvalidParameterValue")
    try:
        with pytest.raises(ClientError) as short:
            ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=3)
    finally:
        server.configure(prefix_capacity_error="InsufficientCidrBlocks")
    assert error_code(short) == "InvalidParameterValue"
    assert "There aren't sufficient free Ipv4 addresses or prefixes" in str(short.value)


def test_a_count_and_a_list_or_prefixes_and_secondaries_do_not_combine(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2)
    interface = primary_interface(ec2, subnet)
    with pytest.raises(ClientError) as both:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=1, Ipv4Prefixes=["10.0.1.16/28"])
    assert error_code(both) == "InvalidParameterCombination"
    with pytest.raises(ClientError) as with_secondaries:
        ec2.create_network_interface(SubnetId=subnet.id, Ipv4PrefixCount=1, SecondaryPrivateIpAddressCount=1)
    assert error_code(with_secondaries) == "InvalidParameterCombination"
    assert prefixes(ec2, interface) == []
    assert len(interfaces_in(ec2, subnet)) == 1


def test_an_interface_is_created_with_its_prefixes_or_not_at_all(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2, "10.0.1.0/25")  # six blocks clear of the addresses EC2 reserves
    created = ec2.create_network_interface(SubnetId=subnet.id, Ipv4PrefixCount=2)["NetworkInterface"]
    primary = ipaddress.IPv4Address(created["PrivateIpAddress"])
    assert len(created["Ipv4Prefixes"]) == 2
    assert all(primary not in ipaddress.IPv4Network(p["Ipv4Prefix"]) for p in created["Ipv4Prefixes"])
    assert prefixes(ec2, created["NetworkInterfaceId"]) == [p["Ipv4Prefix"] for p in created["Ipv4Prefixes"]]

    with pytest.raises(ClientError) as short:  # at most four blocks left, one of them perhaps the new primary's
        ec2.create_network_interface(SubnetId=subnet.id, Ipv4PrefixCount=5)
    assert error_code(short) == "InsufficientCidrBlocks"
    assert len(interfaces_in(ec2, subnet)) == 1


def test_unassigning_takes_exactly_the_named_prefixes_and_deleting_frees_them(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2)
    interface = primary_interface(ec2, subnet)
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=3)
    first, second, third = prefixes(ec2, interface)

    with pytest.raises(ClientError) as not_there:
        ec2.unassign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4Prefixes=[second, "10.0.1.128/28"])
    assert error_code(not_there) == "InvalidParameterValue"
    assert prefixes(ec2, interface) == [first, second, third]

    ec2.unassign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4Prefixes=[second])
    assert prefixes(ec2, interface) == [first, third]
    # The freed block is the lowest free one again.
    other = ec2.create_network_interface(SubnetId=subnet.id, PrivateIpAddress="10.0.1.100")["NetworkInterface"]
    ec2.assign_private_ip_addresses(NetworkInterfaceId=other["NetworkInterfaceId"], Ipv4PrefixCount=1)
    assert prefixes(ec2, other["NetworkInterfaceId"]) == [second]

    before = available(ec2, subnet)
    ec2.delete_network_interface(NetworkInterfaceId=other["NetworkInterfaceId"])
    assert available(ec2, subnet) == before + 16 + 1


def test_ipv6_prefixes_are_80s_of_the_subnets_64(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2)
    interface = primary_interface(ec2, subnet)

    answer = ec2.assign_ipv6_addresses(NetworkInterfaceId=interface, Ipv6PrefixCount=2)

    assigned = [ipaddress.IPv6Network(p) for p in answer["AssignedIpv6Prefixes"]]
    assert [p.prefixlen for p in assigned] == [80, 80]
    assert all(p.subnet_of(subnet.ipv6_cidr) for p in assigned)
    assert assigned[0] != assigned[1]
    assert answer["AssignedIpv6Addresses"] == []
    assert [p["Ipv6Prefix"] for p in describe(ec2, interface)["Ipv6Prefixes"]] == answer["AssignedIpv6Prefixes"]

    removed = ec2.unassign_ipv6_addresses(NetworkInterfaceId=interface, Ipv6Prefixes=answer["AssignedIpv6Prefixes"][:1])
    assert removed["UnassignedIpv6Prefixes"] == answer["AssignedIpv6Prefixes"][:1]
    assert [p["Ipv6Prefix"] for p in describe(ec2, interface)["Ipv6Prefixes"]] == answer["AssignedIpv6Prefixes"][1:]


def test_prefix_reservations_are_used_first_and_explicit_ones_never_automatically(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2, "10.0.1.0/25")
    ec2.create_subnet_cidr_reservation(SubnetId=subnet.id, Cidr="10.0.1.16/28", ReservationType="explicit")
    ec2.create_subnet_cidr_reservation(SubnetId=subnet.id, Cidr="10.0.1.64/27", ReservationType="prefix")
    interface = primary_interface(ec2, subnet)

    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=3)
    # Both blocks of the prefix reservation, then the lowest block outside the explicit one.
    assert prefixes(ec2, interface) == ["10.0.1.64/28", "10.0.1.80/28", "10.0.1.32/28"]

    created = ec2.create_network_interface(SubnetId=subnet.id, SecondaryPrivateIpAddressCount=40)["NetworkInterface"]
    reserved = [ipaddress.IPv4Network("10.0.1.16/28"), ipaddress.IPv4Network("10.0.1.64/27")]
    taken = [ipaddress.IPv4Address(a["PrivateIpAddress"]) for a in created["PrivateIpAddresses"]]
    assert [a for a in taken if any(a in r for r in reserved)] == []
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, PrivateIpAddresses=["10.0.1.17"])  # named: allowed


def test_instances_not_built_on_nitro_get_no_prefixes(ec2: BaseClient) -> None:
    subnet = make_subnet(ec2)
    interface = primary_interface(ec2, subnet, "c4.large")  # Xen
    with pytest.raises(ClientError) as refused:
        ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, Ipv4PrefixCount=1)
    assert error_code(refused) == "InvalidParameterValue"
    with pytest.raises(ClientError) as refused_ipv6:
        ec2.assign_ipv6_addresses(NetworkInterfaceId=interface, Ipv6PrefixCount=1)
    assert error_code(refused_ipv6) == "InvalidParameterValue"
    assert prefixes(ec2, interface) == []
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, SecondaryPrivateIpAddressCount=2)
    assert len(addresses(ec2, interface)) == 3


def test_a_replayed_recording_gives_back_the_same_addresses_and_prefixes(
    ec2: BaseClient, server: MotoServer, recording: Path, tmp_path: Path
) -> None:
    """Runs after the others: the recording holds every test's requests."""
    interface = primary_interface(ec2, make_subnet(ec2))
    ec2.assign_private_ip_addresses(NetworkInterfaceId=interface, SecondaryPrivateIpAddressCount=3)
    ec2.assign_ipv6_addresses(NetworkInterfaceId=interface, Ipv6PrefixCount=1, Ipv6AddressCount=1)
    held_now = held(ec2)
    assert any(i[2] for i in held_now) and any(i[4] for i in held_now)  # IPv4 and IPv6 prefixes among them

    copy = tmp_path / "recording.jsonl"
    copy.write_bytes(recording.read_bytes())
    with MotoServer(local_ec2=True, args=["--state-file", str(copy)]) as replayed:
        assert held(ec2_client(replayed.endpoint_url)) == held_now


def held(ec2: BaseClient) -> list[tuple[Any, ...]]:
    """What each interface holds, by id."""
    return [
        (
            i["NetworkInterfaceId"],
            i["PrivateIpAddresses"],
            i.get("Ipv4Prefixes"),
            i["Ipv6Addresses"],
            i.get("Ipv6Prefixes"),
        )
        for i in ec2.describe_network_interfaces()["NetworkInterfaces"]
    ]
