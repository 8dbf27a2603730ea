"""EC2's token buckets in a real Redis: shared by every limiter, priorities, AIMD on throttling."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from services.cloudworker.providers.aws import Ec2Budget
from services.cloudworker.ratelimit import (
    Priority,
    RedisRateLimiter,
    at_priority,
    connect_sync,
)
from tests.support.redis_server import RedisServer


class Stop(Exception):
    """Raised by the sleep below: the limiter wanted to wait."""


def refuse_to_wait(seconds: float) -> None:
    raise Stop(seconds)


def limiter(redis_server: RedisServer, budget: Ec2Budget, scope: str, **kwargs: object) -> RedisRateLimiter:
    return RedisRateLimiter(connect_sync(redis_server.url, cluster=False), budget, scope=scope, **kwargs)  # type: ignore[arg-type]


def takes_before_waiting(rate_limiter: RedisRateLimiter, operation: str = "AttachNetworkInterface") -> int:
    taken = 0
    with pytest.raises(Stop):
        for _ in range(1000):
            rate_limiter.acquire(operation)
            taken += 1
    return taken


def test_a_priority_leaves_its_reserve_to_those_above_it(redis_server: RedisServer) -> None:
    # Burst 20, refilled so slowly that no token comes back during the test.
    budget = Ec2Budget(qps=0.001, burst=20)
    scope = f"test-{uuid.uuid4().hex}"
    with at_priority(Priority.HOUSEKEEPING):
        assert takes_before_waiting(limiter(redis_server, budget, scope, sleep=refuse_to_wait)) == 10
    with at_priority(Priority.EXCESS):
        assert takes_before_waiting(limiter(redis_server, budget, scope, sleep=refuse_to_wait)) == 10 - 4
    with at_priority(Priority.REFILL):
        assert takes_before_waiting(limiter(redis_server, budget, scope, sleep=refuse_to_wait)) == 4


def test_two_limiters_share_one_budget(redis_server: RedisServer) -> None:
    budget = Ec2Budget(qps=10, burst=5)
    scope = f"test-{uuid.uuid4().hex}"
    replicas = [limiter(redis_server, budget, scope) for _ in range(2)]
    stamps: list[float] = []
    lock = threading.Lock()

    def spend(rate_limiter: RedisRateLimiter) -> None:
        with at_priority(Priority.REFILL):
            for _ in range(15):
                rate_limiter.acquire("AssignPrivateIpAddresses")
                with lock:
                    stamps.append(time.monotonic())

    threads = [threading.Thread(target=spend, args=(r,)) for r in replicas for _ in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 60 tokens from a bucket of 5 refilled at 10/s: the last one no earlier than 5.5 s after the start.
    assert len(stamps) == 60
    assert max(stamps) - started >= (60 - 5) / 10 - 0.1
    # And no window of one second saw more than the rate plus the burst.
    for first in stamps:
        assert sum(1 for s in stamps if first <= s < first + 1.0) <= 10 + 5 + 1


def test_a_throttled_answer_halves_the_rate_and_it_climbs_back(redis_server: RedisServer) -> None:
    budget = Ec2Budget(qps=100, burst=10)
    scope = f"test-{uuid.uuid4().hex}"
    observed: list[tuple[str, float]] = []

    class Observer:
        def observe_take(self, operation: str, bucket: str, tokens_left: float, rate_factor: float) -> None:
            observed.append(("take", rate_factor))

        def observe_throttled(self, operation: str, bucket: str, rate_factor: float) -> None:
            observed.append(("throttled", rate_factor))

    # Recovering faster than in service, to keep the test short.
    rate_limiter = limiter(redis_server, budget, scope, observer=Observer(), recover_per_s=0.5)
    assert rate_limiter.throttled("AssignPrivateIpAddresses") == pytest.approx(0.5)
    assert rate_limiter.throttled("AssignPrivateIpAddresses") == pytest.approx(0.25, abs=0.01)
    tokens, factor = rate_limiter.state(budget.bucket_for("AssignPrivateIpAddresses"))
    assert tokens <= 0 and factor == pytest.approx(0.25, abs=0.01)
    rate_limiter.acquire("AssignPrivateIpAddresses")
    time.sleep(0.5)  # the recovery is a function of time itself: this is the time the test measures
    rate_limiter.acquire("AssignPrivateIpAddresses")
    assert [kind for kind, _ in observed] == ["throttled", "throttled", "take", "take"]
    assert observed[-1][1] > observed[-2][1] > 0.25


def test_redis_away_falls_back_to_a_bucket_of_this_process() -> None:
    server = RedisServer().start()
    rate_limiter = RedisRateLimiter(
        connect_sync(server.url, cluster=False, timeout_s=0.5), Ec2Budget(qps=1000, burst=3), scope="gone"
    )
    server.close()
    assert rate_limiter.acquire("AssignPrivateIpAddresses") == 0.0
