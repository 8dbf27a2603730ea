"""The pool scripts run as one Redis Functions library: a Redis that lacks it (restarted without its
data, flushed) is given it by the next call, whoever makes it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ipam.v1 import allocator_pb2 as pb
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.redis_server import RedisServer, pool_libraries


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "redis-py"])
def test_a_redis_without_the_pool_library_is_given_it_by_the_calls_that_find_it_missing(
    redis_server: RedisServer, pipelined: bool
) -> None:
    with AllocatorProcess(redis_server.url, redis_pipeline_scripts=pipelined) as allocator:
        api = Api(allocator.address)
        node = api.node_with_pool(v4=16, pre_allocate=0)
        client = redis_server.client()
        loaded = pool_libraries(client)
        assert len(loaded) == 1
        client.function_flush()  # as a Redis that came back without its AOF and RDB

        def allocate(i: int) -> str:
            request = pb.AllocateNextRequest(node=node, owner=f"pod-{i}", family=pb.FAMILY_IPV4)
            return str(api.alloc.AllocateNext(request, timeout=5).ipv4.ip)

        with ThreadPoolExecutor(8) as pool:
            ips = list(pool.map(allocate, range(8)))
        api.close()
        assert len(set(ips)) == 8
        assert pool_libraries(client) == loaded
