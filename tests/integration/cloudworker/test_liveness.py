"""Workers' liveness, end to end: two real workers and the real allocator, seen through `ipamctl status`.

An idle worker must stay alive in status and in the consumer group (on Redis 7.0 an empty blocking
read does not reset a consumer's idle time, so the group alone took idle workers for dead ones),
and a killed one must disappear once its heartbeat expires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.polling import poll
from tests.support.redis_server import RedisServer, free_port
from tests.support.worker_process import WorkerProcess

CLAIM_IDLE_SECONDS = 0.5  # the consumer group's clean-up looks for idle consumers this often
HEARTBEAT_SECONDS = 3.0  # renewed every second
PRUNED = "idle consumers without pending events"  # what the worker logs when it removes consumers


@pytest.fixture
def workers() -> Iterator[tuple[AllocatorProcess, list[WorkerProcess]]]:
    """Two workers whose EC2 is away (no node here needs it): they only read the empty stream."""
    redis = RedisServer().start()
    allocator = AllocatorProcess(redis.url).start()
    started = [
        WorkerProcess(
            redis.url,
            allocator.address,
            f"http://127.0.0.1:{free_port()}",
            consumer_name=f"liveness-{i}",
            claim_idle_seconds=CLAIM_IDLE_SECONDS,
            heartbeat_seconds=HEARTBEAT_SECONDS,
        ).start()
        for i in range(2)
    ]
    try:
        yield allocator, started
    finally:
        for worker in started:
            worker.stop()
        allocator.stop()
        redis.close()


def status(allocator: AllocatorProcess) -> dict[str, bool]:
    """`ipamctl status -o json`'s workers: name -> alive."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAM_")}
    env.update(IPAM_GRPC_ADDRESS=allocator.address, IPAM_TOKEN=ADMIN_TOKEN)
    result = subprocess.run(
        [sys.executable, "-m", "clients.ipamctl", "status", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return {w["name"]: w["alive"] for w in json.loads(result.stdout)["workers"]}


def test_idle_workers_stay_alive_and_a_killed_one_disappears(
    workers: tuple[AllocatorProcess, list[WorkerProcess]],
) -> None:
    allocator, (first, second) = workers
    both = {"liveness-0": True, "liveness-1": True}
    poll(lambda: status(allocator) == both, timeout=30, interval=0.2)
    # The scenario is time itself: idle for several times the old threshold (the claim time), the
    # cluster with nothing to do. Status keeps both alive throughout, and neither removed the other.
    idle_until = time.monotonic() + 6 * CLAIM_IDLE_SECONDS
    while time.monotonic() < idle_until:
        assert status(allocator) == both
    for worker in (first, second):
        assert PRUNED not in worker.log_text(), worker.log_tail()

    second.kill()
    poll(lambda: status(allocator) == {"liveness-0": True}, timeout=HEARTBEAT_SECONDS + 10, interval=0.2)
