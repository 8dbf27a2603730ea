"""The client's retry decision for keyed calls (pure: no server)."""

from __future__ import annotations

import time

import grpc

from clients.client import IpamClientError, _key_of, _retry_delay
from services.core.reasons import ErrorReason


def _error(reason: str) -> IpamClientError:
    return IpamClientError(grpc.StatusCode.ABORTED, reason, "may have been applied")


def test_the_answers_of_a_failover_are_retried_with_a_growing_delay() -> None:
    later = time.monotonic() + 60
    for reason in (ErrorReason.OUTCOME_UNKNOWN, ErrorReason.STORE_UNAVAILABLE):
        delays = [_retry_delay(_error(reason), attempt, later, None) for attempt in (1, 2, 3, 4, 5, 9)]
        assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert _retry_delay(_error(ErrorReason.POOL_EMPTY), 1, later, None) is None


def test_no_retry_past_the_failover_window_or_the_deadline() -> None:
    unknown = _error(ErrorReason.OUTCOME_UNKNOWN)
    now = time.monotonic()
    assert _retry_delay(unknown, 1, now, None) is None  # the window is over
    assert _retry_delay(unknown, 9, now + 0.5, None) is None  # the delay would end past the window
    assert _retry_delay(unknown, 1, now + 60, time.monotonic() + 0.05) is None  # ... past the deadline
    assert _retry_delay(unknown, 1, now + 60, time.monotonic() + 5) == 0.1


def test_a_call_without_a_key_gets_a_fresh_one_and_a_given_key_is_kept() -> None:
    assert _key_of("pod-1") == "pod-1"
    first, second = _key_of(""), _key_of("")
    assert first.startswith("ipam-client-") and first != second
