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
