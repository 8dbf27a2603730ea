"""`python -m services.demo_seed`: registers a demo node and gives its pool addresses through the
admin API (as the cloud worker would after attaching them). Idempotent: re-running changes nothing."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from clients.client import IpamClient, IpamClientError, node_spec
from ipam.v1 import nodes_pb2


def seed(client: IpamClient, node: str, addresses: int, subnet: str) -> None:
    network = ipaddress.ip_network(subnet)
    try:
        client.create_node(node_spec(node, instance_id=f"i-{node}", instance_type="m5.large", pre_allocate=8))
        print(f"created node {node}")
    except IpamClientError as exc:
        if exc.reason != "NODE_ALREADY_EXISTS":
            raise
        print(f"node {node} exists")
    hosts = network.hosts()
    gateway = str(next(hosts))
    ips = [str(next(hosts)) for _ in range(addresses)]
    interface = nodes_pb2.Interface(id=f"eni-{node}-0", mac="02:00:00:00:00:01", device_index=0,
                                    subnet_id="subnet-demo", subnet_cidr=str(network), gateway_ip=gateway)
    reply = client.add_addresses(nodes_pb2.AddAddressesRequest(
        node=node, interface=interface, ips=ips, vpc_cidrs=[str(network.supernet(new_prefix=16))]))
    print(f"node {node}: {len(reply.added_ips)} new addresses in {network}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=os.environ.get("IPAM_GRPC_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--addresses", type=int, default=32, help="addresses per node")
    args = parser.parse_args(argv)
    token = os.environ.get("IPAM_ADMIN_TOKEN") or None
    with IpamClient(args.address, token=token, timeout=10) as client:
        for index in range(args.nodes):
            seed(client, f"demo-node-{index + 1}", args.addresses, f"10.0.{index * 16}.0/20")
    return 0


if __name__ == "__main__":
    sys.exit(main())
