"""EC2 error codes → the provider error tree, and the backoff schedule (no server needed)."""

from __future__ import annotations

import pytest

from services.cloudworker.providers.aws import RetryPolicy, classify_error
from services.cloudworker.providers.errors import (
    LimitExceeded,
    NoPrefixRoom,
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
        ("InsufficientCidrBlocks", 400, NoPrefixRoom),
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


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("There aren't sufficient free Ipv4 addresses or prefixes", NoPrefixRoom),
        ("Instance 'i-1' already has an interface attached at device index '1'.", ProviderError),
    ],
)
def test_invalid_parameter_value_for_a_subnet_without_a_free_prefix(message: str, expected: type) -> None:
    """EC2 answers a subnet without a free /28 with InvalidParameterValue too; only its message tells."""
    assert classify_error("InvalidParameterValue", 400, message) is expected
    assert issubclass(NoPrefixRoom, SubnetFull)


def test_every_kind_is_a_provider_error() -> None:
    for kind in (SubnetFull, LimitExceeded, Throttled, NotFound, Transient):
        assert issubclass(kind, ProviderError)


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay=0.5, max_delay=3.0)
    assert [policy.delay(a) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
