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
    with pytest.raises(ValidationError, match=r"IPAM_CLOUD='gcp' is not a cloud this worker knows \(known: aws\)"):
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
