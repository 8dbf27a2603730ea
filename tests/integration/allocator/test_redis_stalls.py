"""Redis frozen with SIGSTOP while calls are in flight, then continued: a change sent to Redis is
never answered "nothing happened", and the client's retries of one call never cost a second address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from clients.client import Family, IpamClient, IpamClientError
from ipam.v1 import allocator_pb2 as pb
from services.core.reasons import ErrorReason
from tests.support.allocator_process import ADMIN_TOKEN, CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api, reason_of
from tests.support.polling import poll
from tests.support.redis_server import RedisServer

# How long Redis stays frozen while a call is in flight: longer than the allocator's 1 s Redis
# timeout, so the call's first tries fail and its retries go out while Redis is still frozen.
STALL_S = 2.5


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[RedisServer, AllocatorProcess]]:
    # A Redis of its own: freezing it must not stall the rest of the suite.
    with RedisServer() as server, AllocatorProcess(server.url) as allocator:
        yield server, allocator


@pytest.fixture
def api(stack: tuple[RedisServer, AllocatorProcess]) -> Iterator[Api]:
    client = Api(stack[1].address)
    yield client
    client.close()


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    pid = server._processes[0].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def settled_dump(server: RedisServer, api: Api, node: str) -> dict[str, str]:
    """The pool's IPv4 allocations once Redis has run what was queued while it was frozen.

    Redis runs every connection's queued commands as soon as it is continued; a round trip on a
    connection of our own after that leaves nothing of the freeze still unread."""
    server.client().ping()
    return api.dump(node)[0]


def in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def warm(api: Api, node: str) -> None:
    """Runs allocate_next and release once, so Redis has the pool scripts: a frozen Redis's first use
    of them would answer that the function is missing on waking instead of running it."""
    api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="warm-up", family=pb.FAMILY_IPV4), timeout=5)
    api.alloc.Release(pb.ReleaseRequest(node=node, owner="warm-up"), timeout=5)


def held_by(dump: dict[str, str], owner: str) -> set[str]:
    return {ip for ip, o in dump.items() if o == owner}


def test_a_change_sent_to_a_frozen_redis_is_answered_outcome_unknown_not_unavailable(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, _ = stack
    node = api.node_with_pool(v4=8, pre_allocate=0)
    warm(api, node)
    request = pb.AllocateNextRequest(node=node, owner="keyed", family=pb.FAMILY_IPV4, idempotency_key="k-1")
    with frozen(server), pytest.raises(grpc.RpcError) as caught:
        api.alloc.AllocateNext(request, timeout=10)  # a plain stub: no retries
    assert caught.value.code() == grpc.StatusCode.ABORTED, caught.value.details()
    assert reason_of(caught.value) == ErrorReason.OUTCOME_UNKNOWN
    assert "may have been applied" in (caught.value.details() or "")
    # And so it was: Redis ran the script when it woke. UNAVAILABLE ("nothing happened") would have lied.
    held = held_by(settled_dump(server, api, node), "keyed")
    assert len(held) == 1
    # The retry with the same key gets that address.
    assert api.alloc.AllocateNext(request, timeout=5).ipv4.ip in held


def test_an_unanswered_allocation_without_a_key_is_given_back_once_redis_answers(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, _ = stack
    node = api.node_with_pool(v4=8, pre_allocate=0)
    warm(api, node)
    requests = [
        (api.alloc.AllocateNext, pb.AllocateNextRequest(node=node, owner="keyless", family=pb.FAMILY_IPV4)),
        (api.alloc.Allocate, pb.AllocateRequest(node=node, owner="keyless", ip="10.20.0.17")),
    ]
    for call, request in requests:
        with frozen(server), pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert (caught.value.code(), reason_of(caught.value)) == (grpc.StatusCode.ABORTED, "OUTCOME_UNKNOWN")
        assert "gives back whatever it took once redis answers" in (caught.value.details() or "")
        # Once Redis has run what it held (the round trip of `settled_dump`), the allocator gives
        # back what the script took: no address stays held for a caller who was never told of it.
        settled_dump(server, api, node)
        poll(lambda: not held_by(api.dump(node)[0], "keyless"), timeout=10)


def test_a_read_of_a_frozen_redis_is_unavailable_within_the_deadline(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, _ = stack
    node = api.node_with_pool(v4=2, pre_allocate=0)
    with frozen(server), pytest.raises(grpc.RpcError) as caught:
        api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=0.5)  # shorter than the 1 s Redis timeout
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert reason_of(caught.value) == ErrorReason.STORE_UNAVAILABLE
    assert "redis did not answer within" in (caught.value.details() or "")


def test_the_client_s_retries_of_one_allocate_next_hold_one_address_and_return_it(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, allocator = stack
    node = api.node_with_pool(v4=8, pre_allocate=0)
    with IpamClient(allocator.address, token=CLIENT_TOKEN, timeout=15) as client:
        with frozen(server):
            thread, out = in_thread(lambda: client.allocate_next(node, owner="hung", family=Family.IPV4))
            time.sleep(STALL_S)  # the stall itself (the stimulus), not a wait for a condition
        thread.join(20)
    assert "error" not in out, out.get("error")
    held = held_by(settled_dump(server, api, node), "hung")
    assert held == {out["result"].ipv4.ip}


def test_the_client_s_retries_of_one_allocate_return_its_result(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, allocator = stack
    node = api.create_node(pre_allocate=0)
    ip = api.seed(node, v4=4)[0]
    with IpamClient(allocator.address, token=CLIENT_TOKEN, timeout=15) as client:
        with frozen(server):
            thread, out = in_thread(lambda: client.allocate(node, ip, "hung-specific"))
            time.sleep(STALL_S)
        thread.join(20)
    # Without a shared key, the retry after the first try had run answered IP_ALREADY_ALLOCATED.
    assert "error" not in out, out.get("error")
    assert out["result"].ip == ip
    assert held_by(settled_dump(server, api, node), "hung-specific") == {ip}


def test_a_release_sent_to_a_frozen_redis_is_not_retried_by_the_client(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, allocator = stack
    node = api.node_with_pool(v4=4, pre_allocate=0)
    warm(api, node)
    with IpamClient(allocator.address, token=CLIENT_TOKEN, timeout=15) as client:
        ip = client.allocate_next(node, owner="leaving", family=Family.IPV4).ipv4.ip
        with frozen(server), pytest.raises(IpamClientError) as caught:
            client.release(node, ip=ip)
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.ABORTED, ErrorReason.OUTCOME_UNKNOWN)
    assert ip not in settled_dump(server, api, node)  # it was applied when Redis woke


def test_ipamctl_dump_against_a_frozen_redis_says_what_it_waited_for(
    stack: tuple[RedisServer, AllocatorProcess], api: Api
) -> None:
    server, allocator = stack
    node = api.node_with_pool(v4=2, pre_allocate=0)
    env = {**os.environ, "IPAM_GRPC_ADDRESS": allocator.address, "IPAM_TOKEN": ADMIN_TOKEN}
    with frozen(server):
        result = subprocess.run(
            [sys.executable, "-m", "clients.ipamctl", "dump", node, "--timeout", "3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode != 0
    assert "UNAVAILABLE STORE_UNAVAILABLE" in result.stderr, result.stderr
    assert "redis did not answer within" in result.stderr, result.stderr
    assert "DEADLINE_EXCEEDED" not in result.stderr
