"""Redis memory per pooled IPv4 address in prefix mode, against single (/32) addresses; and per
IPv6 address allocated from a /80.

Starts its own redis-server and allocator, fills nodes through `AddAddresses` (admin token) with
IPv4 /28 prefixes or with the same number of single addresses, and reports per pooled address:
Redis `used_memory` after minus before over every node (`INFO memory`), and `MEMORY USAGE` of one
node's keys (`SCAN` on its hash tag). Every address is free: the pool as the worker leaves it after a
refill. An allocated address costs more in either mode (its allocation, owner and key entries).
Then each node gets an IPv6 /80 and `--ipv6-allocations` AllocateNext IPv6 calls: the /80 alone, and
`used_memory` per allocated address (the prefix is never written out address by address).

    .venv/bin/python -m bench.prefix_memory                 # 200 nodes; 6 and 27 prefixes per node
    .venv/bin/python -m bench.prefix_memory --nodes 50 --prefixes 27
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from clients.client import AsyncIpamClient, node_spec
from ipam.v1 import nodes_pb2
from services.core.family import Family
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.redis_server import RedisServer

_T = TypeVar("_T")
VPC_CIDR = "10.0.0.0/8"
PREFIX_SIZE = 16
CONCURRENCY = 32


def _interface(node_index: int) -> nodes_pb2.Interface:
    subnet = ipaddress.ip_network(VPC_CIDR).network_address + node_index * 65536
    return nodes_pb2.Interface(
        id=f"eni-{node_index:08x}{0:09x}",  # as long as EC2's interface ids
        mac=f"02:00:00:{node_index >> 8 & 0xFF:02x}:{node_index & 0xFF:02x}:01",
        device_index=1,
        subnet_id=f"subnet-{node_index:017x}",
        subnet_cidr=f"{subnet}/16",
        gateway_ip=str(subnet + 1),
    )


def _request(node: str, node_index: int, prefixes: int, single: bool) -> nodes_pb2.AddAddressesRequest:
    interface = _interface(node_index)
    base = ipaddress.ip_network(interface.subnet_cidr).network_address + 256  # past the subnet's reserved ones
    blocks = [f"{base + PREFIX_SIZE * i}/28" for i in range(prefixes)]
    if single:
        ips = [str(a) for block in blocks for a in ipaddress.ip_network(block)]
        return nodes_pb2.AddAddressesRequest(node=node, interface=interface, ips=ips, vpc_cidrs=[VPC_CIDR])
    return nodes_pb2.AddAddressesRequest(node=node, interface=interface, ipv4_prefixes=blocks, vpc_cidrs=[VPC_CIDR])


async def _fill(address: str, names: list[str], prefixes: int, single: bool) -> None:
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=30) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(call: Awaitable[_T]) -> _T:
            async with gate:
                return await call

        await asyncio.gather(*(bounded(client.create_node(node_spec(n, instance_type="m5.large"))) for n in names))
        await asyncio.gather(
            *(bounded(client.add_addresses(_request(n, i, prefixes, single))) for i, n in enumerate(names))
        )


def measure(
    redis_server: RedisServer, allocator: AllocatorProcess, nodes: int, prefixes: int, single: bool
) -> dict[str, Any]:
    """FLUSHALL, then `nodes` nodes of `prefixes` prefixes (or as many single addresses) each."""
    mode = "single" if single else "prefix"
    names = [f"mem-{mode}-{prefixes}-{i}" for i in range(nodes)]
    with redis_server.client() as redis:
        redis.flushall()
        before = redis.info("memory")["used_memory"]
        asyncio.run(_fill(allocator.address, names, prefixes, single))
        after = redis.info("memory")["used_memory"]
        keys = {str(k): redis.memory_usage(k, samples=0) for k in redis.scan_iter(match=f"ipam:{{{names[0]}}}*")}
    addresses = nodes * prefixes * PREFIX_SIZE
    return {
        "mode": mode,
        "nodes": nodes,
        "addresses_per_node": prefixes * PREFIX_SIZE,
        "used_memory_bytes_per_address": round((after - before) / addresses, 1),
        "memory_usage_bytes_per_address": round(sum(keys.values()) / (prefixes * PREFIX_SIZE), 1),
        "memory_usage_of_one_node": dict(sorted(keys.items())),
    }


async def _fill_ipv6(address: str, names: list[str], allocations: int) -> None:
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=30) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(call: Awaitable[_T]) -> _T:
            async with gate:
                return await call

        await asyncio.gather(
            *(
                bounded(client.allocate_next(n, family=Family.IPV6, owner=f"pod-{i}"))
                for n in names
                for i in range(allocations)
            )
        )


async def _add_ipv6_prefixes(address: str, names: list[str]) -> None:
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=30) as client:
        specs = [node_spec(n, instance_type="m5.large", ipv6_enabled=True, pre_allocate=0) for n in names]
        await asyncio.gather(*(client.create_node(s) for s in specs))
        for i, name in enumerate(names):
            subnet = ipaddress.ip_network("2600:1f00::/40").network_address + (i << 64)
            interface = nodes_pb2.Interface(id=f"eni-{i:08x}{0:09x}", subnet_ipv6_cidr=f"{subnet}/64")
            request = nodes_pb2.AddAddressesRequest(node=name, interface=interface, ipv6_prefix=f"{subnet}/80")
            await client.add_addresses(request)


def measure_ipv6(
    redis_server: RedisServer, allocator: AllocatorProcess, nodes: int, allocations: int
) -> dict[str, Any]:
    """FLUSHALL, `nodes` nodes with a /80 each, then `allocations` IPv6 addresses taken on each."""
    names = [f"mem-ipv6-{i}" for i in range(nodes)]
    with redis_server.client() as redis:
        redis.flushall()
        asyncio.run(_add_ipv6_prefixes(allocator.address, names))
        before = redis.info("memory")["used_memory"]
        prefix_key = f"ipam:{{{names[0]}}}:default:prefix6"
        prefix_bytes = redis.memory_usage(prefix_key, samples=0)
        asyncio.run(_fill_ipv6(allocator.address, names, allocations))
        after = redis.info("memory")["used_memory"]
        prefix_after = redis.memory_usage(prefix_key, samples=0)
    return {
        "nodes": nodes,
        "allocated_per_node": allocations,
        "prefix_key_bytes": [prefix_bytes, prefix_after],
        "used_memory_bytes_per_allocated_address": round((after - before) / (nodes * allocations), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200, help="nodes per measurement")
    parser.add_argument(
        "--prefixes", type=int, action="append", help="prefixes per node (repeatable; default 6 and 27)"
    )
    parser.add_argument("--ipv6-nodes", type=int, default=50, help="nodes with an IPv6 /80")
    parser.add_argument("--ipv6-allocations", type=int, default=100, help="IPv6 addresses allocated per /80")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = parser.parse_args(argv)
    sizes = args.prefixes or [6, 27]  # 96 addresses; 432, an m5.large at its prefix capacity
    with RedisServer() as redis_server:
        with redis_server.client() as redis:
            limits = {k: v for k, v in redis.config_get("*-max-listpack-entries").items()}
        allocator = AllocatorProcess(redis_server.url).start()
        try:
            # A first fill loads the scripts and grows Redis's tables: left out of the figures.
            measure(redis_server, allocator, args.nodes, min(sizes), single=False)
            results = [
                measure(redis_server, allocator, args.nodes, p, single=single)
                for p in sizes
                for single in (False, True)
            ]
            ipv6 = measure_ipv6(redis_server, allocator, args.ipv6_nodes, args.ipv6_allocations)
        finally:
            allocator.stop()
    if args.json:
        print(json.dumps({"listpack_limits": limits, "results": results, "ipv6_80": ipv6}, indent=2))
        return 0
    print(f"redis {', '.join(f'{k} {v}' for k, v in sorted(limits.items()))}")
    print(f"{'mode':<8}{'nodes':>7}{'addresses/node':>16}{'used_memory B/addr':>20}{'MEMORY USAGE B/addr':>21}")
    for r in results:
        print(
            f"{r['mode']:<8}{r['nodes']:>7}{r['addresses_per_node']:>16}"
            f"{r['used_memory_bytes_per_address']:>20}{r['memory_usage_bytes_per_address']:>21}"
        )
    print(
        f"ipv6 /80: {ipv6['nodes']} nodes x {ipv6['allocated_per_node']} allocated: "
        f"{ipv6['used_memory_bytes_per_allocated_address']} B per allocated address; the /80's own key "
        f"{ipv6['prefix_key_bytes'][0]} B before, {ipv6['prefix_key_bytes'][1]} B after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
