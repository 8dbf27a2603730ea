"""The clouds the worker knows, by the name `IPAM_CLOUD` gives: each builds its provider from the
worker's settings. A second cloud is its module in this package and one line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.cloudworker.metrics import WorkerMetrics
from services.cloudworker.providers import aws
from services.cloudworker.providers.base import CloudProvider

if TYPE_CHECKING:
    from services.cloudworker.settings import WorkerSettings


@dataclass(frozen=True, slots=True)
class BuiltProvider:
    """A provider and what closes the connections it opened (its rate limiter's, say)."""

    provider: CloudProvider
    close: Callable[[], None]


ProviderFactory = Callable[["WorkerSettings", WorkerMetrics], BuiltProvider]


def _aws(settings: WorkerSettings, metrics: WorkerMetrics) -> BuiltProvider:
    provider, limiter_client = aws.from_settings(settings, metrics)
    return BuiltProvider(provider, limiter_client.close)


CLOUDS: dict[str, ProviderFactory] = {"aws": _aws}


def build_provider(settings: WorkerSettings, metrics: WorkerMetrics) -> BuiltProvider:
    """The provider of `settings.cloud`; ValueError names the clouds known when it is not one."""
    factory = CLOUDS.get(settings.cloud)
    if factory is None:
        raise ValueError(unknown_cloud(settings.cloud))
    return factory(settings, metrics)


def unknown_cloud(name: str) -> str:
    """The message for a cloud the worker does not know."""
    return f"IPAM_CLOUD={name!r} is not a cloud this worker knows (known: {', '.join(sorted(CLOUDS))})"
