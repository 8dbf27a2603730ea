"""Shared fixtures: real redis-server processes on free loopback ports (never ../shared)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("redis-server") is None:
        raise pytest.UsageError("redis-server is not installed: run `make setup`")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone Redis for the session; tests keep apart by unique node names."""
    server = RedisServer().start()
    yield server
    server.close()
