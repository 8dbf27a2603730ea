"""One moto server and one demo network for every cloudworker integration test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.moto_server import DemoNetwork, MotoServer, create_demo_network, ec2_client


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="session")
def demo_network(moto_server: MotoServer) -> DemoNetwork:
    return create_demo_network(ec2_client(moto_server.endpoint_url))
