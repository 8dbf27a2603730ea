"""Two allocator processes on one Redis, 200 concurrent callers draining a pool of 1,000."""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter

import grpc
import pytest

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import allocator_pb2_grpc
from ipam.v1 import nodes_pb2 as npb
from tests.support.allocator_process import CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api, reason_of
from tests.support.redis_server import RedisServer

POOL_SIZE = 1000
CALLERS = 200
METADATA = (("authorization", f"Bearer {CLIENT_TOKEN}"),)


async def _drain(addresses: list[str], node: str) -> tuple[list[tuple[str, str]], Counter[str]]:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [allocator_pb2_grpc.AllocatorStub(c) for c in channels]
    handed: list[tuple[str, str]] = []
    failures: Counter[str] = Counter()

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        serial = 0
        while True:
            owner = f"caller-{index}-{serial}"
            serial += 1
            try:
                reply = await stub.AllocateNext(
                    pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=20, metadata=METADATA
                )
            except grpc.aio.AioRpcError as exc:
                failures[f"{exc.code().name}/{reason_of(exc)}"] += 1
                return
            handed.append((reply.ipv4.ip, owner))

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    for c in channels:
        await c.close()
    return handed, failures


@pytest.mark.timeout(180)
def test_every_address_is_handed_out_exactly_once(redis_server: RedisServer) -> None:
    with AllocatorProcess(redis_server.url) as one, AllocatorProcess(redis_server.url) as two:
        api = Api(one.address)
        node = api.create_node()
        base = ipaddress.ip_address("10.40.0.0")
        ips = [str(base + i) for i in range(10, 10 + POOL_SIZE)]
        for start in range(0, POOL_SIZE, 250):
            api.nodes.AddAddresses(npb.AddAddressesRequest(node=node, ips=ips[start : start + 250]), timeout=10)

        handed, failures = asyncio.run(_drain([one.address, two.address], node))

        addresses = [ip for ip, _ in handed]
        assert len(addresses) == POOL_SIZE
        assert sorted(addresses) == sorted(ips)  # every address, each exactly once
        assert failures == Counter({"RESOURCE_EXHAUSTED/POOL_EMPTY": CALLERS})
        assert api.dump(node)[0] == dict(handed)  # Redis agrees, owner by owner
        with pytest.raises(grpc.RpcError) as info:  # the 1,001st call
            api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="late"), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        api.close()
