"""Shared fixtures: real redis-server processes on free loopback ports.

A test that needs redis-server is skipped where it is not installed (the unit tests run anyway).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One standalone Redis for the session; tests keep apart by unique node names."""
    server = RedisServer().start()
    yield server
    server.close()
