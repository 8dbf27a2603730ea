"""Behaviour that depends on the allocator's settings: each test runs its own allocator process."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import allocator_pb2_grpc
from tests.support.allocator_process import CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api, channel, expect_error, reason_of
from tests.support.polling import poll
from tests.support.redis_server import RedisServer


def test_reuse_cooldown_keeps_released_addresses_out_and_asks_for_a_refill(redis_server: RedisServer) -> None:
    with AllocatorProcess(redis_server.url, reuse_cooldown_seconds=1.5) as process:
        api = Api(process.address)
        node = api.create_node(pre_allocate=1, pre_allocate_set=True)
        api.seed(node, 2)
        first = api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="a"), timeout=5
        ).ipv4.ip
        api.alloc.Release(pb.ReleaseRequest(node=node, ip=first), timeout=5)
        second = api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="b"), timeout=5
        ).ipv4.ip
        assert second != first
        # The cooldown binds Allocate of the named address too, and the refusal changes nothing.
        before = api.dump(node)
        expect_error(
            api.alloc.Allocate,
            pb.AllocateRequest(node=node, ip=first, owner="x"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "IP_COOLING_DOWN",
        )
        assert api.dump(node) == before
        stats = api.stats(node)
        # One free address, but cooling: it is no headroom, so the pool asks for one more.
        assert (stats.cooling_ips, stats.needed_ips) == (1, 1)
        expect_error(
            api.alloc.AllocateNext,
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="c"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "POOL_COOLING_DOWN",
        )
        # Once cooled, it is handed out again.
        reply = poll(lambda: _try_allocate(api, node, "c"), timeout=10)
        assert reply.ipv4.ip == first
        api.close()


def _try_allocate(api: Api, node: str, owner: str) -> pb.AllocateNextResponse | None:
    try:
        return api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=5)
    except grpc.RpcError as exc:
        assert reason_of(exc) == "POOL_COOLING_DOWN"
        return None


def test_disabled_family_is_failed_precondition(redis_server: RedisServer) -> None:
    with AllocatorProcess(redis_server.url, ipv6_enabled=False) as process:
        api = Api(process.address)
        node = api.node_with_pool(2, 2)
        expect_error(
            api.alloc.AllocateNext,
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="a"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "IPV6_DISABLED",
        )
        expect_error(
            api.alloc.Allocate,
            pb.AllocateRequest(node=node, ip="2001:db8::100", owner="a"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "IPV6_DISABLED",
        )
        # Unspecified family = every enabled family: IPv4 only here.
        reply = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="a"), timeout=5)
        assert reply.ipv4.ip and not reply.HasField("ipv6")
        api.close()


def test_redis_down_is_unavailable_within_the_deadline() -> None:
    redis = RedisServer(aof=True).start()
    try:
        with AllocatorProcess(redis.url, redis_timeout_seconds=0.5) as process:
            api = Api(process.address)
            node = api.node_with_pool(2)
            redis.kill()
            for timeout in (0.3, 2.0):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="a"), timeout=timeout)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
                assert time.monotonic() - started < timeout + 0.2
            redis.restart()
            reply = poll(lambda: _allocate_when_back(api, node))
            assert reply.ipv4.ip
            api.close()
    finally:
        redis.close()


def _allocate_when_back(api: Api, node: str) -> pb.AllocateNextResponse | None:
    try:
        return api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="b"), timeout=2)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        return None


def test_sigterm_lets_in_flight_calls_finish(redis_server: RedisServer) -> None:
    process = AllocatorProcess(redis_server.url).start()
    api = Api(process.address)
    node = api.node_with_pool(0)
    outcome: dict[str, object] = {}

    def waiting_caller() -> None:
        try:
            api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="w", wait_for_refill=True), timeout=2.0
            )
        except grpc.RpcError as exc:
            outcome["code"], outcome["reason"] = exc.code(), reason_of(exc)

    thread = threading.Thread(target=waiting_caller)
    thread.start()
    poll(lambda: _requests_in_flight(process) >= 1)
    assert process.stop() == 0
    thread.join(5)
    # The call ran to its own end (pool still empty), not cut off by the shutdown.
    assert outcome == {"code": grpc.StatusCode.RESOURCE_EXHAUSTED, "reason": "POOL_EMPTY"}
    api.close()


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
            return True
    except OSError:
        return False


def _requests_in_flight(process: AllocatorProcess) -> float:
    """AllocateNext calls started minus finished, read from the Prometheus endpoint."""

    text = urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=2).read().decode()
    started = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('ipam_allocator_in_flight{method="AllocateNext"}')
    )
    return started


def test_workers_share_one_port_and_stop_together(redis_server: RedisServer) -> None:
    with AllocatorProcess(redis_server.url, workers=2) as process:
        api = Api(process.address)
        node = api.node_with_pool(4)
        api.close()
        poll(lambda: _answers(process.metrics_port) and _answers(process.metrics_port + 1))  # both processes up
        for _ in range(20):  # a channel each: the kernel spreads connections, not calls, over the processes
            with channel(process.address, CLIENT_TOKEN) as connection:
                allocator_pb2_grpc.AllocatorStub(connection).Dump(pb.DumpRequest(node=node), timeout=5)

        def dumps_served(port: int) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("ipam_allocator_requests_total{") and 'method="Dump"' in line
            )

        served = [dumps_served(process.metrics_port), dumps_served(process.metrics_port + 1)]
        assert sum(served) == 20 and min(served) > 0, served
        assert process.stop() == 0


def _worker_pids(process: AllocatorProcess) -> list[int]:
    """The pids of the `--workers` children of the allocator's parent process."""
    assert process.process is not None
    children = Path(f"/proc/{process.process.pid}/task/{process.process.pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def test_a_worker_that_cannot_start_stops_the_allocator_with_an_error(redis_server: RedisServer) -> None:
    process = AllocatorProcess(redis_server.url, workers=2)
    try:
        with socket.socket() as taken:  # worker 1's metrics port, held by someone else
            taken.bind(("127.0.0.1", process.metrics_port + 1))
            taken.listen()
            process.spawn()
            assert process.process is not None
            poll(lambda: process.process.poll() is not None, timeout=30)  # type: ignore[union-attr]
        log = process.log_text()
        assert process.process.returncode == 1, log
        assert "allocator worker 1 failed" in log and "Address already in use" in log, log
        assert "allocator worker 1 (pid" in log and "stopping the others" in log, log
    finally:
        process.kill()


def test_a_killed_worker_takes_the_other_down_and_the_exit_code_says_so(redis_server: RedisServer) -> None:
    with AllocatorProcess(redis_server.url, workers=2) as process:
        poll(lambda: _answers(process.metrics_port) and _answers(process.metrics_port + 1))
        first, second = _worker_pids(process)
        os.kill(first, signal.SIGKILL)
        assert process.process is not None
        poll(lambda: process.process.poll() is not None, timeout=30)  # type: ignore[union-attr]
        assert process.process.returncode == 128 + signal.SIGKILL, process.log_tail()
        assert not Path(f"/proc/{second}").exists()  # stopped and reaped by the parent before it exited
        assert f"(pid {first}) ended on its own (exit {128 + signal.SIGKILL})" in process.log_text()


def _pool_gauges(process: AllocatorProcess, node: str) -> dict[tuple[str, str], float]:
    """ipam_allocator_pool_ips of one node, by (family, state)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=2).read().decode()
    return {
        (s.labels["family"], s.labels["state"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "ipam_allocator_pool_ips"
        for s in family.samples
        if s.labels.get("node") == node
    }


def test_pool_gauges_follow_the_pool_as_node_stats_count_it() -> None:
    # A Redis of its own: on the session's, every 0.1 s the gauges of every node earlier tests left.
    with RedisServer() as redis, AllocatorProcess(redis.url, pool_metrics_seconds=0.1) as process:
        api = Api(process.address)
        node = api.create_node(pre_allocate=4, pre_allocate_set=True)
        api.seed(node, 6)
        for owner in ("a", "b", "c"):
            api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=5)
        stats = api.stats(node)
        assert (stats.available_ips, stats.used_ips, stats.needed_ips) == (6, 3, 1)
        expected = {
            ("ipv4", "available"): 6,
            ("ipv4", "used"): 3,
            ("ipv4", "needed"): stats.needed_ips,
            ("ipv4", "excess"): stats.excess_ips,
            ("ipv4", "cooling"): 0,
        }
        gauges = poll(lambda: (g := _pool_gauges(process, node)) and g.get(("ipv4", "used")) == 3 and g)
        assert {k: v for k, v in gauges.items() if k[0] == "ipv4"} == expected
        api.close()
