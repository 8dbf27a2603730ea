"""Rate limits of the worker's cloud calls.

`TokenBucket` is one in-process bucket (Cilium's `--limit-ipam-api-qps/burst`). A `Budget` is a
cloud's throttling model, declared by its provider (EC2's is `providers.aws.Ec2Budget`): the
bucket each call takes a token of. `RedisRateLimiter` keeps a budget's buckets in Redis, taken by
one atomic script, so every worker replica spends the same budget; a throttled answer lowers a
bucket's rate (multiplicative decrease) and it climbs back (additive increase). Callers waiting at
a lower `Priority` leave part of each bucket to those at a higher one: refills first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster

from services.core import redis_client

log = logging.getLogger(__name__)


class TokenBucket:
    """Allows `burst` calls at once, then `qps` calls per second. Thread-safe and blocking.

    A caller reserves its token under the lock and sleeps outside it, so concurrent callers
    (the worker calls the provider from `asyncio.to_thread`) queue up in order without holding
    the lock while they wait. `clock` and `sleep` are injectable so tests need no wall time.
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"need qps > 0 and burst >= 1, got qps={qps} burst={burst}")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = clock()
        self._taken = 0

    @property
    def taken(self) -> int:
        """Tokens handed out since creation (one per API call, Describe pages included)."""
        return self._taken

    def reserve(self) -> float:
        """Take a token now; return the seconds the caller must wait before making its call."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            self._taken += 1
            # A negative balance is a queue of reservations, each 1/qps after the previous one.
            return max(-self._tokens / self.qps, 0.0)

    def acquire(self, operation: str = "", params: Mapping[str, Any] | None = None) -> float:
        """Block until the caller may make one call; return the seconds waited (any operation)."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait

    def throttled(self, operation: str = "", params: Mapping[str, Any] | None = None) -> float:
        """A fixed-rate bucket does not adapt; returns its rate factor (1)."""
        return 1.0


class Priority(IntEnum):
    """Who is calling: a lower value is served first."""

    REFILL = 0  # a pool in deficit: pods wait for it
    EXCESS = 1  # giving back what a pool holds too much of
    HOUSEKEEPING = 2  # resync reads, the leaked-interface collector


# The share of each bucket's burst a priority leaves to the ones above it.
RESERVED_SHARE = {Priority.REFILL: 0.0, Priority.EXCESS: 0.2, Priority.HOUSEKEEPING: 0.5}

# The priority of the cloud calls made from here on (a context variable: `asyncio.to_thread` and
# new tasks carry it into the provider's threads).
current_priority: ContextVar[Priority] = ContextVar("ipam_cloud_priority", default=Priority.EXCESS)


@contextlib.contextmanager
def at_priority(priority: Priority) -> Iterator[None]:
    """Cloud calls inside the block are made at `priority`."""
    token = current_priority.set(priority)
    try:
        yield
    finally:
        current_priority.reset(token)


@dataclass(frozen=True, slots=True)
class Bucket:
    """One token bucket: `burst` tokens, refilled at `rate` per second."""

    name: str
    burst: float
    rate: float


class Budget(Protocol):
    """A cloud's request budget, which its provider declares: which bucket a call takes a token
    from, and every bucket there is."""

    def bucket_for(self, operation: str, params: Mapping[str, Any] | None = None) -> Bucket:
        """The bucket a call of `operation` with `params` takes its token from."""
        ...

    def buckets(self) -> list[Bucket]:
        """Every bucket of the budget (for the metrics)."""
        ...


class BudgetObserver(Protocol):
    """Told about every token taken and every throttled answer."""

    def observe_take(self, operation: str, bucket: str, tokens_left: float, rate_factor: float) -> None:
        """A call of `operation` took a token of `bucket`; what the bucket holds afterwards."""

    def observe_throttled(self, operation: str, bucket: str, rate_factor: float) -> None:
        """The cloud throttled a call of `operation`; `bucket`'s rate is now `rate_factor` of its own."""


class _NullBudgetObserver:
    def observe_take(self, operation: str, bucket: str, tokens_left: float, rate_factor: float) -> None:
        pass

    def observe_throttled(self, operation: str, bucket: str, rate_factor: float) -> None:
        pass


class Limiter(Protocol):
    """What the provider's calls go through."""

    def acquire(self, operation: str = "", params: Mapping[str, Any] | None = None) -> float:
        """Block until a call of `operation` may be made; return the seconds waited."""
        ...

    def throttled(self, operation: str = "", params: Mapping[str, Any] | None = None) -> float:
        """The cloud throttled a call of `operation`: slow down; returns the new rate factor."""
        ...


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


RECOVER_PER_S = 0.02  # additive increase: from half speed back to full in 25 s


class RedisRateLimiter:
    """A `Budget`'s buckets in Redis, shared by every worker that spends it (for EC2: of one
    account and Region).

    Keys share one hash tag, so on Redis Cluster each script touches one slot. Thread-safe. When
    Redis cannot be reached a call is not held up: it takes a token of an in-process bucket of the
    same size instead (this replica alone then keeps to the budget)."""

    TTL_MS = 3_600_000
    DECREASE = 0.5  # multiplicative decrease on a throttled answer
    MIN_FACTOR = 0.05
    MAX_WAIT_S = 1.0  # a waiting caller tries again at least this often (others may have let go)
    STEP_BACK_S = 0.02

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        budget: Budget,
        *,
        scope: str,
        observer: BudgetObserver | None = None,
        sleep: Callable[[float], None] = time.sleep,
        recover_per_s: float = RECOVER_PER_S,
    ) -> None:
        """`scope`: whose budget this is, as its provider names it (part of the keys); `recover_per_s`:
        the rate factor regained per second after a throttled answer."""
        self.recover_per_s = recover_per_s
        self.client = client
        self.budget = budget
        self.scope = scope
        self.observer: BudgetObserver = observer or _NullBudgetObserver()
        self._sleep = sleep
        self._take = client.register_script(_script("bucket_take"))
        self._throttled = client.register_script(_script("bucket_throttled"))
        self._local: dict[str, TokenBucket] = {}
        self._local_lock = threading.Lock()
        self._waiting = [0, 0, 0]  # callers of this process waiting, by priority
        self._waiting_lock = threading.Lock()

    def key(self, bucket: Bucket) -> str:
        """The Redis key of a bucket."""
        return f"ipam:{{{self.scope}}}:bucket:{bucket.name}"

    def acquire(self, operation: str = "", params: Mapping[str, Any] | None = None) -> float:
        bucket = self.budget.bucket_for(operation, params)
        priority = current_priority.get()
        reserve = bucket.burst * RESERVED_SHARE[priority]
        waited = 0.0
        with self._queued(priority):
            while True:
                if self._ahead_of(priority):
                    # In this process, a caller steps back while one of a higher priority waits.
                    self._sleep(self.STEP_BACK_S)
                    waited += self.STEP_BACK_S
                    continue
                try:
                    granted, wait, tokens, factor = self._take_token(bucket, reserve)
                except redis.RedisError as exc:
                    log.warning("the cloud's budget in Redis unreachable (%s): this replica counts alone", exc)
                    return waited + self._local_bucket(bucket).acquire()
                if granted:
                    self.observer.observe_take(operation, bucket.name, tokens, factor)
                    return waited
                pause = min(max(wait, 0.005), self.MAX_WAIT_S)
                self._sleep(pause)
                waited += pause

    def throttled(self, operation: str, params: Mapping[str, Any] | None = None) -> float:
        """The cloud throttled a call: lowers its bucket's rate; returns the new rate factor."""
        bucket = self.budget.bucket_for(operation, params)
        try:
            factor = float(
                self._throttled(
                    keys=[self.key(bucket)],
                    args=[bucket.rate, bucket.burst, self.recover_per_s, self.DECREASE, self.MIN_FACTOR, self.TTL_MS],
                )
            )
        except redis.RedisError as exc:
            log.warning("the cloud's budget in Redis unreachable (%s): throttling not recorded", exc)
            return 1.0
        self.observer.observe_throttled(operation, bucket.name, factor)
        return factor

    def state(self, bucket: Bucket) -> tuple[float, float]:
        """Tokens left and rate factor of a bucket as stored (tokens not yet refilled to now)."""
        tokens, factor = self.client.hmget(self.key(bucket), ["tokens", "factor"])
        return (float(tokens) if tokens is not None else bucket.burst, float(factor) if factor is not None else 1.0)

    def _take_token(self, bucket: Bucket, reserve: float) -> tuple[bool, float, float, float]:
        granted, wait, tokens, factor = self._take(
            keys=[self.key(bucket)],
            args=[bucket.rate, bucket.burst, min(reserve, bucket.burst - 1), self.recover_per_s, self.TTL_MS],
        )
        return bool(int(granted)), float(wait), float(tokens), float(factor)

    def _ahead_of(self, priority: Priority) -> bool:
        with self._waiting_lock:
            return any(self._waiting[p] for p in range(priority))

    @contextlib.contextmanager
    def _queued(self, priority: Priority) -> Iterator[None]:
        with self._waiting_lock:
            self._waiting[priority] += 1
        try:
            yield
        finally:
            with self._waiting_lock:
                self._waiting[priority] -= 1

    def _local_bucket(self, bucket: Bucket) -> TokenBucket:
        with self._local_lock:
            if bucket.name not in self._local:
                self._local[bucket.name] = TokenBucket(bucket.rate, max(int(bucket.burst), 1))
            return self._local[bucket.name]


def connect_sync(
    url: str, *, cluster: bool, timeout_s: float = 2.0, sentinels: str = "", sentinel_master: str = ""
) -> redis.Redis | RedisCluster:
    """A blocking Redis client for the limiter (the provider runs in threads)."""
    return redis_client.connect_sync(
        url, cluster=cluster, timeout_s=timeout_s, sentinels=sentinels, sentinel_master=sentinel_master
    )
