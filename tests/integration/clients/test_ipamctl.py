"""ipamctl against the real allocator: output, one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.allocator_process import ADMIN_TOKEN, CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def allocator(redis_server: RedisServer) -> Iterator[AllocatorProcess]:
    with AllocatorProcess(redis_server.url) as process:
        yield process


def ipamctl(allocator: AllocatorProcess, *args: str, token: str = CLIENT_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IPAM_GRPC_ADDRESS": allocator.address, "IPAM_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "clients.ipamctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_allocate_dump_release(allocator: AllocatorProcess) -> None:
    api = Api(allocator.address)
    node = api.node_with_pool(2)
    got = ipamctl(allocator, "--json", "allocate", node, "--owner", "pod-1", "--family", "ipv4")
    assert got.returncode == 0, got.stderr
    ip = json.loads(got.stdout)["ipv4"]["ip"]
    dumped = ipamctl(allocator, "--json", "dump", node)
    assert json.loads(dumped.stdout)["ipv4"] == {ip: "pod-1"}
    released = ipamctl(allocator, "release", node, "--owner", "pod-1")
    assert released.returncode == 0 and ip in released.stdout
    assert api.dump(node) == ({}, {})
    api.close()


def test_nodes_list_is_sorted_by_watermark(allocator: AllocatorProcess) -> None:
    api = Api(allocator.address)
    full = api.node_with_pool(20)  # needs nothing
    empty = api.create_node()  # needs 8
    listed = ipamctl(allocator, "nodes", "list", token=ADMIN_TOKEN)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert rows.index(empty) < rows.index(full)
    api.close()


@pytest.mark.parametrize(
    "args,token,expected",
    [
        (("allocate", "no-such-node", "--owner", "p", "--family", "ipv4"), CLIENT_TOKEN, "NOT_FOUND NODE_NOT_FOUND"),
        (("nodes", "list"), CLIENT_TOKEN, "PERMISSION_DENIED ADMIN_ROLE_REQUIRED"),
        (("release", "some-node", "--ip", "not-an-ip"), CLIENT_TOKEN, "INVALID_ARGUMENT INVALID_IP"),
        (("ping",), "wrong-token", "UNAUTHENTICATED INVALID_CREDENTIALS"),
    ],
)
def test_errors_print_one_line_and_exit_non_zero(
    allocator: AllocatorProcess, args: tuple[str, ...], token: str, expected: str
) -> None:
    result = ipamctl(allocator, *args, token=token)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ipamctl: {expected}"), result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(allocator: AllocatorProcess) -> None:
    assert ipamctl(allocator, "allocate").returncode == 2
