"""The token bucket every cloud API call goes through (Cilium's `--limit-ipam-api-qps/burst`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


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

    def acquire(self) -> float:
        """Block until the caller may make one call; return the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait
