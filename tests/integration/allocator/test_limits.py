"""The server's limits: past them calls are shed with a reason, health checks always answer, waiting
calls are answered before their deadline, undecodable requests are refused. Each test runs its own
allocator process (its settings differ)."""

from __future__ import annotations

from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ipam.v1 import allocator_pb2 as pb
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api, reason_of
from tests.support.polling import poll
from tests.support.redis_server import RedisServer


def _outcome(error: grpc.RpcError | None) -> str:
    return "OK" if error is None else f"{error.code().name} {reason_of(error)}"


def _waiting_calls(api: Api, node: str, count: int, deadline: float) -> list[grpc.Future]:
    """`count` AllocateNext calls on one channel, each waiting for a refill that never comes."""
    return [
        api.alloc.AllocateNext.future(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=f"o{i}", wait_for_refill=True),
            timeout=deadline,
        )
        for i in range(count)
    ]


@pytest.mark.timeout(120)
def test_past_the_limit_calls_are_shed_with_a_reason_and_health_always_answers(redis_server: RedisServer) -> None:
    limit, calls = 100, 2000
    with AllocatorProcess(redis_server.url, max_concurrent_rpcs=limit) as process:
        api = Api(process.address)
        node = api.node_with_pool(0)  # empty, and no worker: every call admitted waits until its deadline
        futures = _waiting_calls(api, node, calls, deadline=8.0)
        # Once the server sheds it is past its limit: its health checks must still answer.
        poll(lambda: any(f.done() for f in futures), timeout=10)
        with grpc.insecure_channel(process.address) as health_channel:
            health = health_pb2_grpc.HealthStub(health_channel)
            checks = Counter(
                health_pb2.HealthCheckResponse.ServingStatus.Name(
                    health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                )
                for _ in range(50)
            )
        outcomes = Counter(_outcome(f.exception()) for f in futures)
        api.close()
    assert checks == {"SERVING": 50}
    # Exactly the limit's worth was admitted (none ends before every call has arrived) and answered
    # with the pool's reason; every other call was shed with the server's, none dropped without one.
    assert outcomes == {"RESOURCE_EXHAUSTED POOL_EMPTY": limit, "RESOURCE_EXHAUSTED SERVER_OVERLOADED": calls - limit}


@pytest.mark.timeout(120)
def test_waiting_calls_are_answered_before_their_deadline(redis_server: RedisServer) -> None:
    calls = 300
    # A Redis slowed by the 300 calls on a busy machine would answer some OUTCOME_UNKNOWN at the 1 s
    # watchdog; what is under test is the deadline, so the watchdog is out of its way.
    with AllocatorProcess(redis_server.url, redis_timeout_seconds=4) as process:
        api = Api(process.address)
        node = api.node_with_pool(0)
        outcomes = Counter(_outcome(f.exception()) for f in _waiting_calls(api, node, calls, deadline=6.0))
        api.close()
    # Each got the pool's own answer from the server, none a DEADLINE_EXCEEDED of its own client.
    assert outcomes == {"RESOURCE_EXHAUSTED POOL_EMPTY": calls}
