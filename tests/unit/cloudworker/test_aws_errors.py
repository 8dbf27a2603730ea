"""EC2 error codes → the provider error tree, and the backoff schedule (no server needed)."""

from __future__ import annotations

import pytest

from services.cloudworker.providers.aws import RetryPolicy, classify_error
from services.cloudworker.providers.errors import (
    LimitExceeded,
    NotFound,
    ProviderError,
    SubnetFull,
    Throttled,
    Transient,
)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("RequestLimitExceeded", 503, Throttled),
        ("Client.RequestLimitExceeded", 503, Throttled),
        ("Throttling", 400, Throttled),
        ("InsufficientFreeAddressesInSubnet", 400, SubnetFull),
        ("InsufficientCidrBlocks", 400, SubnetFull),
        ("PrivateIpAddressLimitExceeded", 400, LimitExceeded),
        ("AttachmentLimitExceeded", 400, LimitExceeded),
        ("InvalidNetworkInterfaceID.NotFound", 400, NotFound),
        ("InvalidInstanceID.NotFound", 400, NotFound),
        ("InvalidInstanceType", 400, NotFound),
        ("InternalError", 500, Transient),
        ("Server.Unavailable", 503, Transient),
        ("SomethingNew", 502, Transient),
        ("InvalidParameterValue", 400, ProviderError),
        ("UnauthorizedOperation", 403, ProviderError),
    ],
)
def test_classify_error(code: str, status: int, expected: type[ProviderError]) -> None:
    assert classify_error(code, status) is expected


def test_every_kind_is_a_provider_error() -> None:
    for kind in (SubnetFull, LimitExceeded, Throttled, NotFound, Transient):
        assert issubclass(kind, ProviderError)


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay=0.5, max_delay=3.0)
    assert [policy.delay(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
