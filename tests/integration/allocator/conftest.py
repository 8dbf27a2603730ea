"""The allocator integration suite runs twice: on one Redis and on a 3-master Redis Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.redis_server import RedisCluster, RedisServer


@dataclass
class Backend:
    url: str
    cluster: bool
    server: RedisServer | RedisCluster


@pytest.fixture(scope="session", params=["standalone", "cluster"])
def backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Backend]:
    if request.param == "standalone":
        yield Backend(redis_server.url, False, redis_server)
        return
    cluster = RedisCluster(3).start()
    yield Backend(cluster.url, True, cluster)
    cluster.close()


@pytest.fixture(scope="session")
def allocator(backend: Backend) -> Iterator[AllocatorProcess]:
    process = AllocatorProcess(backend.url, cluster=backend.cluster).start()
    yield process
    process.stop()


@pytest.fixture
def api(allocator: AllocatorProcess) -> Iterator[Api]:
    client = Api(allocator.address)
    yield client
    client.close()
