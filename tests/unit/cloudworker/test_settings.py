"""The worker's settings: the cloud it talks to is named, and only a known one is taken."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.cloudworker.providers.registry import CLOUDS
from services.cloudworker.settings import WorkerSettings


def test_the_cloud_is_aws_by_default_and_registered() -> None:
    assert WorkerSettings().cloud == "aws" and "aws" in CLOUDS


def test_an_unknown_cloud_fails_at_start_up_naming_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPAM_CLOUD", "gcp")
    with pytest.raises(
        ValidationError, match=r"IPAM_CLOUD='gcp' is not a cloud this worker knows \(known: aws, cluster-pool\)"
    ):
        WorkerSettings()


@pytest.mark.parametrize(
    ("endpoint", "setting", "checks"),
    [
        ("", None, False),  # AWS never hands out an address twice: no subnet read per assignment
        ("http://127.0.0.1:5000", None, True),  # the local EC2 may
        ("", "true", True),
        ("http://127.0.0.1:5000", "false", False),
    ],
)
def test_address_conflicts_are_checked_against_a_local_ec2_unless_told(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, setting: str | None, checks: bool
) -> None:
    monkeypatch.setenv("IPAM_EC2_ENDPOINT_URL", endpoint)
    if setting is not None:
        monkeypatch.setenv("IPAM_CHECK_ADDRESS_CONFLICTS", setting)
    assert WorkerSettings().checks_address_conflicts is checks


def test_the_ipv6_gateway_is_the_vpc_routers_link_local_address_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().ipv6_gateway == "fe80:ec2::1"
    monkeypatch.setenv("IPAM_IPV6_GATEWAY", "FE80::0001")
    assert WorkerSettings().ipv6_gateway == "fe80::1"


@pytest.mark.parametrize("value", ["10.0.0.1", "gateway", ""])
def test_an_ipv6_gateway_that_is_not_an_ipv6_address_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("IPAM_IPV6_GATEWAY", value)
    with pytest.raises(ValidationError, match="ipv6_gateway"):
        WorkerSettings()
