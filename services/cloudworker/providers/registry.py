"""The clouds the worker knows, by the name `IPAM_CLOUD` gives: each builds its provider from its
own settings model (which the worker's settings take in) and what the worker hands every provider.
A second cloud is its module in this package, its settings model among `CloudSettings`' bases and
one line in `CLOUDS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from redis.cluster import RedisCluster

from services.cloudworker.metrics import CloudObserver
from services.cloudworker.providers import aws, cluster_pool
from services.cloudworker.providers.base import CloudProvider


class CloudSettings(aws.AwsSettings, cluster_pool.ClusterPoolSettings):
    """Every known cloud's own settings: the worker's settings take them all in."""


@dataclass(frozen=True, slots=True)
class ProviderWiring:
    """What the worker hands every provider besides its settings."""

    cluster: str  # the cluster's name, on what the provider creates (so its leaks are found)
    observer: CloudObserver  # the cloud's metrics, labelled with the provider's name
    connect_redis: Callable[[], Redis | RedisCluster]  # a blocking client of the worker's Redis


@dataclass(frozen=True, slots=True)
class BuiltProvider:
    """A provider and what closes the connections it opened (its rate limiter's, say)."""

    provider: CloudProvider
    close: Callable[[], None]
    description: str = ""  # what the start-up log says of it (endpoint, budget)


ProviderFactory = Callable[[CloudSettings, ProviderWiring], BuiltProvider]


def _aws(settings: CloudSettings, wiring: ProviderWiring) -> BuiltProvider:
    redis = wiring.connect_redis()
    provider = aws.from_settings(settings, wiring.observer, cluster=wiring.cluster, redis=redis)
    return BuiltProvider(provider, redis.close, aws.describe(settings))


def _cluster_pool(settings: CloudSettings, wiring: ProviderWiring) -> BuiltProvider:
    redis = wiring.connect_redis()
    provider = cluster_pool.from_settings(settings, cluster=wiring.cluster, redis=redis, observer=wiring.observer)
    return BuiltProvider(provider, redis.close, cluster_pool.describe(settings))


CLOUDS: dict[str, ProviderFactory] = {"aws": _aws, "cluster-pool": _cluster_pool}


def build_provider(cloud: str, settings: CloudSettings, wiring: ProviderWiring) -> BuiltProvider:
    """The provider of `cloud`; ValueError names the clouds known when it is not one."""
    factory = CLOUDS.get(cloud)
    if factory is None:
        raise ValueError(unknown_cloud(cloud))
    return factory(settings, wiring)


def unknown_cloud(name: str) -> str:
    """The message for a cloud the worker does not know."""
    return f"IPAM_CLOUD={name!r} is not a cloud this worker knows (known: {', '.join(sorted(CLOUDS))})"
