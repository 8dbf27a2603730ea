"""The token bucket, on a fake clock: no wall time is involved."""

from __future__ import annotations

import threading

import pytest

from services.cloudworker.providers.aws import Ec2Budget
from services.cloudworker.ratelimit import Bucket, Priority, TokenBucket, at_priority, current_priority


class FakeClock:
    """A clock that only moves when someone sleeps on it (or the test advances it)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def bucket(qps: float, burst: int, clock: FakeClock) -> TokenBucket:
    return TokenBucket(qps, burst, clock=clock, sleep=clock.sleep)


def test_burst_passes_at_once_then_one_call_per_1_over_qps() -> None:
    clock = FakeClock()
    limiter = bucket(qps=4, burst=20, clock=clock)
    waits = [limiter.acquire() for _ in range(24)]
    assert waits[:20] == [0.0] * 20
    assert waits[20:] == pytest.approx([0.25] * 4)
    assert clock.now == pytest.approx(1.0)
    assert limiter.taken == 24


def test_calls_in_any_window_never_exceed_burst_plus_qps_times_window() -> None:
    clock = FakeClock()
    limiter = bucket(qps=4, burst=20, clock=clock)
    call_times = []
    for _ in range(200):
        limiter.acquire()
        call_times.append(clock.now)
    for window in (0.5, 1.0, 5.0, 20.0):
        for start in call_times:
            in_window = sum(1 for t in call_times if start <= t <= start + window)
            assert in_window <= 20 + 4 * window + 1e-9
    assert clock.now == pytest.approx((200 - 20) / 4)  # and the bucket is not slower than its rate


def test_idle_time_refills_up_to_burst_only() -> None:
    clock = FakeClock()
    limiter = bucket(qps=2, burst=5, clock=clock)
    for _ in range(5):
        limiter.acquire()
    clock.now += 1000.0
    waits = [limiter.acquire() for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0, 0, 0.5])


def test_concurrent_callers_queue_up_without_losing_a_token() -> None:
    """Frozen clock: 8 threads × 10 calls must get the waits 0 (burst) then 1/qps, 2/qps, …"""
    clock = FakeClock()
    limiter = TokenBucket(qps=4, burst=20, clock=clock, sleep=lambda seconds: None)
    waits: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def caller() -> None:
        start.wait()
        for _ in range(10):
            wait = limiter.acquire()
            with lock:
                waits.append(wait)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(waits) == pytest.approx([0.0] * 20 + [k / 4 for k in range(1, 61)])
    assert limiter.taken == 80


@pytest.mark.parametrize(("qps", "burst"), [(0, 1), (-1, 5), (4, 0)])
def test_invalid_settings_are_refused(qps: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(qps, burst)


def test_ec2_budget_puts_each_call_in_its_documented_bucket() -> None:
    budget = Ec2Budget(1.0)
    assert budget.bucket_for("AssignPrivateIpAddresses") == Bucket("AssignPrivateIpAddresses", 100, 5)
    assert budget.bucket_for("CreateTags") == Bucket("CreateTags", 100, 10)
    assert budget.bucket_for("AttachNetworkInterface").name == "mutating"
    assert budget.bucket_for("DescribeNetworkInterfaces", {"Filters": [], "MaxResults": 1000}).name == "non-mutating"
    assert budget.bucket_for("DescribeSubnets", {"SubnetIds": ["subnet-1"]}).name == "non-mutating"
    assert budget.bucket_for("DescribeVpcs", {}).name == "unfiltered-describe"


def test_ec2_budget_scales_by_the_share_and_the_override_replaces_the_model() -> None:
    assert Ec2Budget(0.5).bucket_for("AttachNetworkInterface") == Bucket("mutating", 25, 2.5)
    override = Ec2Budget(0.5, qps=4, burst=20)
    assert override.bucket_for("AssignPrivateIpAddresses") == Bucket("all", 20, 4)
    assert override.buckets() == [Bucket("all", 20, 4)]
    assert {b.name for b in Ec2Budget(1.0).buckets()} >= {"non-mutating", "mutating", "unfiltered-describe"}


@pytest.mark.parametrize(("share", "qps", "burst"), [(0, 0, 0), (1.5, 0, 0), (1, -1, 5), (1, 5, 0)])
def test_ec2_budget_refuses_nonsense(share: float, qps: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Ec2Budget(share, qps=qps, burst=burst)


def test_priority_is_a_context_variable_restored_after_the_block() -> None:
    assert current_priority.get() is Priority.EXCESS
    with at_priority(Priority.HOUSEKEEPING):
        assert current_priority.get() is Priority.HOUSEKEEPING
    assert current_priority.get() is Priority.EXCESS
