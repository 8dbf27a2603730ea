"""Waiting for a condition by polling it (never a sleep standing in for synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(
    condition: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    *,
    describe: Callable[[], str] | None = None,
) -> T:
    """Calls `condition` until it returns something truthy, and returns that; fails after `timeout`
    (with what `describe` says of the last attempt, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f": {describe()}" if describe is not None else ""
            raise AssertionError(f"condition not met within {timeout}s{detail}")
        time.sleep(interval)
