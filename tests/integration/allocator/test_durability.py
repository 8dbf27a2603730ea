"""kill -9 of Redis (AOF, fsync always) and the allocator mid-load: nothing acknowledged is lost."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ipam.v1 import allocator_pb2 as pb
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.polling import poll
from tests.support.redis_server import RedisServer, free_port

TIMER_S = 10  # long enough for the load, both kills and both restarts on a busy machine


@pytest.mark.timeout(120)
def test_acknowledged_allocations_and_timers_survive_kill_9() -> None:
    redis = RedisServer(aof=True).start()
    allocator = AllocatorProcess(redis.url, redis_timeout_seconds=0.5).start()
    try:
        api = Api(allocator.address)
        node = api.node_with_pool(400)
        timed = api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="timed", expiration_seconds=TIMER_S),
            timeout=5,
        ).ipv4.ip
        timer_set_at = time.monotonic()
        acknowledged: dict[str, str] = {timed: "timed"}
        stop = threading.Event()

        def load(worker: int) -> None:
            serial = 0
            while not stop.is_set():
                owner = f"w{worker}-{serial}"
                serial += 1
                try:
                    reply = api.alloc.AllocateNext(
                        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=1
                    )
                except grpc.RpcError:
                    continue
                acknowledged[reply.ipv4.ip] = owner

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        poll(lambda: len(acknowledged) >= 60)
        redis.kill()
        allocator.kill()
        stop.set()
        for t in threads:
            t.join(10)
        assert 60 <= len(acknowledged) < 400

        redis.restart()
        allocator.start()
        v4, _ = api.dump(node)
        assert time.monotonic() - timer_set_at < TIMER_S, "too slow to tell whether the timer survived"
        missing = {ip: owner for ip, owner in acknowledged.items() if v4.get(ip) != owner}
        assert missing == {}
        # The timer set before the crash still fires after it.
        poll(lambda: timed not in api.dump(node)[0], timeout=20)
        api.close()
    finally:
        allocator.stop()
        redis.close()


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


def test_an_allocator_started_before_redis_is_not_serving_until_redis_is_up() -> None:
    redis_later = RedisServer(port=free_port())
    process = AllocatorProcess(redis_later.url)
    try:
        process.spawn()
        poll(lambda: _health(process.address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        api = Api(process.address)
        with pytest.raises(grpc.RpcError) as info:
            api.create_node()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with redis_later:
            poll(lambda: _health(process.address) == health_pb2.HealthCheckResponse.SERVING)
            node = api.node_with_pool(2)
            reply = api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="a"), timeout=5
            )
            assert reply.ipv4.ip in api.dump(node)[0]
        api.close()
    finally:
        process.stop()
