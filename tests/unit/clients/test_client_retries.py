"""The client's retry decision for keyed calls (pure: no server)."""

from __future__ import annotations

import time

import grpc

from clients.client import IpamClientError, _key_of, _retry_delay
from services.core.reasons import ErrorReason


def _error(reason: str) -> IpamClientError:
    return IpamClientError(grpc.StatusCode.ABORTED, reason, "may have been applied")


def test_only_outcome_unknown_is_retried_with_a_growing_delay() -> None:
    unknown = _error(ErrorReason.OUTCOME_UNKNOWN)
    assert [_retry_delay(unknown, attempt, 5, None) for attempt in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert _retry_delay(_error(ErrorReason.POOL_EMPTY), 1, 5, None) is None
    assert _retry_delay(_error(ErrorReason.STORE_UNAVAILABLE), 1, 5, None) is None  # grpc's own retry's


def test_no_retry_past_the_attempts_or_the_deadline() -> None:
    unknown = _error(ErrorReason.OUTCOME_UNKNOWN)
    assert _retry_delay(unknown, 5, 5, None) is None
    assert _retry_delay(unknown, 1, 1, None) is None
    assert _retry_delay(unknown, 1, 5, time.monotonic() + 0.05) is None  # the delay would end past it
    assert _retry_delay(unknown, 1, 5, time.monotonic() + 5) == 0.1


def test_a_call_without_a_key_gets_a_fresh_one_and_a_given_key_is_kept() -> None:
    assert _key_of("pod-1") == "pod-1"
    first, second = _key_of(""), _key_of("")
    assert first.startswith("ipam-client-") and first != second
