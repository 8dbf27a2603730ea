"""`python -m dev.demo_seed`: the demo cluster's cloud and nodes.

In the local EC2 (the moto server) it creates a dual-stack VPC with /18 subnets (large, since
moto may hand out colliding addresses in small ones), a security group and instances of real
instance types, then registers each instance as a node through the admin API. The worker fills
their pools from the cloud. Re-running finds the demo VPC by its tag and changes nothing.

With `IPAM_CLOUD=cluster-pool` (or `--cloud cluster-pool`) there is no cloud: it registers as many
bare-metal nodes, named by nothing but their name (no instance), and touches no EC2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.client import BaseClient

from clients.client import IpamClient, IpamClientError, node_spec
from ipam.v1.nodes_pb2 import NodeSpec
from services.core.reasons import ErrorReason

DEMO_TAG = {"Key": "ipam.io/demo", "Value": "true"}
REGION = "us-east-1"
AVAILABILITY_ZONE = "us-east-1a"
POD_SUBNET_TAGS = {"ipam.io/pods": "true"}
DEMO_IMAGE_ID = "ami-12c6146b"


@dataclass(frozen=True)
class DemoNetwork:
    """A VPC with /18 subnets in one zone, a security group, and running instances.

    `subnet_ids[0]` is the node subnet (the instances' primary interfaces live there); the others
    carry `POD_SUBNET_TAGS`.
    """

    vpc_id: str
    cidr: str
    ipv6_cidr: str
    availability_zone: str
    subnet_ids: tuple[str, ...]
    security_group_id: str
    instances: dict[str, str] = field(default_factory=dict)  # instance id -> instance type


def create_demo_network(
    client: BaseClient,
    *,
    cidr: str = "10.0.0.0/16",
    availability_zone: str = AVAILABILITY_ZONE,
    subnet_count: int = 3,
    instance_types: Sequence[str] = ("m5.large", "c5.xlarge"),
) -> DemoNetwork:
    """Create the demo VPC (dual-stack), its /18 subnets, a security group and one instance per type."""
    vpc = client.create_vpc(CidrBlock=cidr, AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    vpc_id = vpc["VpcId"]
    ipv6_cidr = client.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
    v4_blocks = ipaddress.ip_network(cidr).subnets(new_prefix=18)
    v6_blocks = ipaddress.ip_network(ipv6_cidr).subnets(new_prefix=64)
    subnet_ids = []
    for index in range(subnet_count):
        tags = [{"Key": "Name", "Value": f"demo-{index}"}]
        if index > 0:
            tags += [{"Key": k, "Value": v} for k, v in POD_SUBNET_TAGS.items()]
        subnet = client.create_subnet(
            VpcId=vpc_id,
            CidrBlock=str(next(v4_blocks)),
            Ipv6CidrBlock=str(next(v6_blocks)),
            AvailabilityZone=availability_zone,
            TagSpecifications=[{"ResourceType": "subnet", "Tags": tags}],
        )["Subnet"]
        subnet_ids.append(subnet["SubnetId"])
    group_id = client.create_security_group(GroupName=f"demo-{vpc_id}", Description="demo", VpcId=vpc_id)["GroupId"]
    network = DemoNetwork(
        vpc_id=vpc_id,
        cidr=cidr,
        ipv6_cidr=ipv6_cidr,
        availability_zone=availability_zone,
        subnet_ids=tuple(subnet_ids),
        security_group_id=group_id,
    )
    for instance_type in instance_types:
        instance_id = run_instance(client, network, instance_type)
        network.instances[instance_id] = instance_type
    return network


def run_instance(client: BaseClient, network: DemoNetwork, instance_type: str) -> str:
    """Run one instance of `instance_type` in the node subnet; returns its id."""
    response: dict[str, Any] = client.run_instances(
        ImageId=DEMO_IMAGE_ID,
        MinCount=1,
        MaxCount=1,
        InstanceType=instance_type,
        SubnetId=network.subnet_ids[0],
        SecurityGroupIds=[network.security_group_id],
        Placement={"AvailabilityZone": network.availability_zone},
    )
    return str(response["Instances"][0]["InstanceId"])


def find_demo_network(client: BaseClient) -> DemoNetwork | None:
    """The demo VPC made by an earlier run, with its subnets, group and instances."""
    vpcs = client.describe_vpcs(Filters=[{"Name": f"tag:{DEMO_TAG['Key']}", "Values": [DEMO_TAG["Value"]]}])["Vpcs"]
    if not vpcs:
        return None
    vpc = vpcs[0]
    vpc_filter = [{"Name": "vpc-id", "Values": [vpc["VpcId"]]}]
    subnets = sorted(client.describe_subnets(Filters=vpc_filter)["Subnets"], key=lambda s: s["CidrBlock"])
    groups = [
        g for g in client.describe_security_groups(Filters=vpc_filter)["SecurityGroups"] if g["GroupName"] != "default"
    ]
    network = DemoNetwork(
        vpc_id=vpc["VpcId"],
        cidr=vpc["CidrBlock"],
        ipv6_cidr=(vpc.get("Ipv6CidrBlockAssociationSet") or [{}])[0].get("Ipv6CidrBlock", ""),
        availability_zone=subnets[0]["AvailabilityZone"],
        subnet_ids=tuple(s["SubnetId"] for s in subnets),
        security_group_id=groups[0]["GroupId"] if groups else "",
    )
    reservations = client.describe_instances(
        Filters=[*vpc_filter, {"Name": "instance-state-name", "Values": ["running"]}]
    )["Reservations"]
    for reservation in reservations:
        for instance in reservation["Instances"]:
            network.instances[instance["InstanceId"]] = instance["InstanceType"]
    return network


def register_nodes(client: IpamClient, network: DemoNetwork, pre_allocate: int) -> list[str]:
    """One node per instance, named after it; existing nodes are left as they are."""
    names = []
    for instance_id, instance_type in sorted(network.instances.items()):
        name = f"node-{instance_id.removeprefix('i-')[:12]}"
        spec = node_spec(
            name,
            instance_id=instance_id,
            instance_type=instance_type,
            availability_zone=network.availability_zone,
            vpc_id=network.vpc_id,
            subnet_tags=POD_SUBNET_TAGS,
            pre_allocate=pre_allocate,
            release_excess=True,
        )
        _register(client, spec, f"{instance_type}, {instance_id}")
        names.append(name)
    return names


def register_bare_nodes(client: IpamClient, count: int, pre_allocate: int) -> list[str]:
    """`count` nodes without an instance (the cluster pool's: a node is its own instance), named
    bare-metal-1...; existing nodes are left as they are."""
    names = []
    for i in range(1, count + 1):
        name = f"bare-metal-{i}"
        spec = node_spec(name, pre_allocate=pre_allocate, release_excess=True)
        _register(client, spec, "no instance: its addresses come from the cluster pool")
        names.append(name)
    return names


def _register(client: IpamClient, spec: NodeSpec, what: str) -> None:
    """Creates the node `spec` names, saying so with `what`; one that exists is left as it is."""
    try:
        client.create_node(spec)
        print(f"registered {spec.name} ({what})")
    except IpamClientError as exc:
        if exc.reason != ErrorReason.NODE_ALREADY_EXISTS:
            raise
        print(f"{spec.name} already registered")


def forget_vanished_nodes(client: IpamClient, ec2: BaseClient) -> list[str]:
    """Nodes of an earlier demo whose instances the local EC2 no longer has are deleted: Redis keeps
    its data across `make run`s, and so does the local EC2 (it replays its recorded requests), but
    only as long as its recording is there (`var/data/ec2/`, the `ec2-data` volume)."""
    running = {
        instance["InstanceId"]
        for reservation in ec2.describe_instances()["Reservations"]
        for instance in reservation["Instances"]
    }
    gone = [n.spec.name for n in client.list_nodes() if n.spec.instance_id and n.spec.instance_id not in running]
    for name in gone:
        client.delete_node(name)
        print(f"deleted {name}: its instance is gone")
    return gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--address", default=os.environ.get("IPAM_GRPC_ADDRESS", "127.0.0.1:50051"), help="the allocator"
    )
    parser.add_argument("--ec2-endpoint-url", default=os.environ.get("IPAM_EC2_ENDPOINT_URL", "http://127.0.0.1:5000"))
    parser.add_argument(
        "--instance-types",
        default="m5.large,c5.xlarge,m5.large",
        help="comma-separated instance types of the demo nodes",
    )
    parser.add_argument("--pre-allocate", type=int, default=8)
    parser.add_argument(
        "--cloud",
        default=os.environ.get("IPAM_CLOUD", "aws"),
        help="the workers' cloud: aws (nodes on instances of the local EC2) or cluster-pool (bare-metal nodes)",
    )
    args = parser.parse_args(argv)
    if args.cloud == "cluster-pool":
        with IpamClient(args.address, token=os.environ.get("IPAM_ADMIN_TOKEN") or None, timeout=10) as client:
            register_bare_nodes(client, len(args.instance_types.split(",")), args.pre_allocate)
        return 0
    ec2 = boto3.session.Session().client(
        "ec2",
        region_name=os.environ.get("IPAM_AWS_REGION", REGION),
        endpoint_url=args.ec2_endpoint_url,
        aws_access_key_id=os.environ.get("IPAM_AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("IPAM_AWS_SECRET_ACCESS_KEY", "testing"),
    )
    network = find_demo_network(ec2)
    if network is None:
        network = create_demo_network(ec2, instance_types=args.instance_types.split(","))
        ec2.create_tags(Resources=[network.vpc_id], Tags=[DEMO_TAG])
        print(f"created demo VPC {network.vpc_id} ({network.cidr}) with {len(network.subnet_ids)} subnets")
    with IpamClient(args.address, token=os.environ.get("IPAM_ADMIN_TOKEN") or None, timeout=10) as client:
        forget_vanished_nodes(client, ec2)
        register_nodes(client, network, args.pre_allocate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
