"""The real worker against the moto server: dead ends fail callers at once and show on the node, a
family the node does not enable never moves the cloud, and switching one off gives it back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from tests.integration.cloudworker.test_worker import Cloud, ipv6_in_ec2, secondaries
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.api import Api, expect_error
from tests.support.moto_server import DemoNetwork, MotoServer, ec2_client, run_instance
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

RELEASE_DELAY_S = 3.0


@pytest.fixture(scope="module")
def cloud(moto_server: MotoServer, demo_network: DemoNetwork) -> Iterator[Cloud]:
    """As test_worker's (a Redis of its own), with an excess release delay to see."""
    with RedisServer() as redis:
        allocator = AllocatorProcess(redis.url).start()
        worker = WorkerProcess(
            redis.url,
            allocator.address,
            moto_server.endpoint_url,
            excess_release_delay_seconds=RELEASE_DELAY_S,
        ).start()
        api = Api(allocator.address)
        yield Cloud(api, ec2_client(moto_server.endpoint_url), demo_network, allocator, moto_server)
        api.close()
        assert worker.stop() == 0, worker.log_text()[-3000:]
        allocator.stop()


GHOST_INSTANCE = "i-0123456789abcdef0"  # well-formed, and no such instance in the local EC2


def ipamctl(cloud: Cloud, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAM_")}
    env.update({"IPAM_GRPC_ADDRESS": cloud.allocator.address, "IPAM_TOKEN": ADMIN_TOKEN})
    return subprocess.run(
        [sys.executable, "-m", "clients.ipamctl", *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_a_node_whose_instance_does_not_exist_fails_callers_at_once_and_shows_why(cloud: Cloud) -> None:
    api = cloud.api
    node = f"ghost-{uuid.uuid4().hex[:8]}"
    created = ipamctl(cloud, "node", "create", node, "--instance-id", GHOST_INSTANCE, "--instance-type", "m5.large")
    assert created.returncode == 0, created.stderr
    poll(lambda: api.stats(node).deficit_reason == "instance-not-found")
    shown = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert GHOST_INSTANCE in shown.last_error and shown.last_error_ms > 0
    listed = {n.spec.name: n for n in api.nodes.ListNodes(npb.ListNodesRequest(), timeout=5).nodes}
    assert listed[node].last_error == shown.last_error

    started = time.monotonic()
    expect_error(  # at once, not at the deadline: no refill can come
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod", wait_for_refill=True),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "INSTANCE_NOT_FOUND",
    )
    assert time.monotonic() - started < 2
    show = ipamctl(cloud, "node", "show", node)
    assert show.returncode == 0, show.stderr
    line = next(line for line in show.stdout.splitlines() if "last cloud error" in line)
    assert GHOST_INSTANCE in line and "UTC" in line


def test_a_node_fixed_after_a_dead_end_clears_its_last_error(cloud: Cloud) -> None:
    api = cloud.api
    node = api.create_node(instance_id=GHOST_INSTANCE, instance_type="m5.large")
    poll(lambda: api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).last_error != "")
    instance_id = run_instance(cloud.ec2, cloud.network, "m5.large")
    fixed = npb.NodeSpec(name=node, instance_id=instance_id, instance_type="m5.large")
    api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=fixed), timeout=5)

    def cleared() -> bool:
        shown = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
        return (shown.last_error, shown.last_error_ms, shown.stats.deficit_reason) == ("", 0, "")

    poll(lambda: api.stats(node).available_ips == 8 and cleared())


def test_an_ipv6_waiter_gets_ipv6_and_moves_no_ipv4_address(cloud: Cloud) -> None:
    api = cloud.api
    # pre_allocate 0: the watermark needs nothing; only the waiting IPv6 caller asks for an address.
    node, instance_id = cloud.node(ipv6_enabled=True, pre_allocate=0, pre_allocate_set=True)
    reply = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="v6", wait_for_refill=True), timeout=30
    )
    assert reply.ipv6.ip in ipv6_in_ec2(cloud.ec2, instance_id)
    stats = api.stats(node)
    assert (stats.available_ips, stats.waiting_ipv4, stats.waiting_ipv6) == (0, 0, 0)
    assert secondaries(cloud.ec2, instance_id) == []


def test_switching_ipv6_off_gives_its_free_addresses_back_to_the_cloud(cloud: Cloud) -> None:
    api = cloud.api
    spec = dict(pre_allocate=2, pre_allocate_set=True)
    node, instance_id = cloud.node(ipv6_enabled=True, **spec)
    poll(lambda: (api.stats(node).available_ips, api.stats(node).available_ipv6) == (2, 2))
    held = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner="v6"), timeout=5)
    poll(lambda: api.stats(node).available_ipv6 == 3)  # back at the watermark: 1 used, 2 free

    off = npb.NodeSpec(name=node, instance_id=instance_id, instance_type="m5.large", ipv6_enabled=False, **spec)
    api.nodes.UpdateNode(npb.UpdateNodeRequest(spec=off), timeout=5)  # release_excess off: given back all the same
    poll(lambda: ipv6_in_ec2(cloud.ec2, instance_id) == [held.ipv6.ip])
    assert api.dump(node)[1] == {held.ipv6.ip: "v6"}
    stats = api.stats(node)
    assert (stats.available_ipv6, stats.excess_ipv6, stats.available_ips) == (1, 0, 2)


def test_excess_is_given_back_only_after_the_release_delay(cloud: Cloud) -> None:
    api = cloud.api
    node, instance_id = cloud.node(release_excess=True, pre_allocate=2, pre_allocate_set=True)
    poll(lambda: api.stats(node).available_ips == 2)
    owners = [f"pod-{i}" for i in range(4)]
    for owner in owners:
        api.alloc.AllocateNext(
            pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner, wait_for_refill=True), timeout=30
        )
    poll(lambda: api.stats(node).available_ips == 6)  # 4 used, 2 free: the watermark
    for owner in owners:  # the callers leave: 4 in excess (the test allocator has no reuse cooldown)
        api.alloc.Release(pb.ReleaseRequest(node=node, owner=owner), timeout=5)
    left = time.monotonic()
    assert api.stats(node).excess_ips == 4

    def given_back() -> bool:
        api.nodes.Resync(npb.ResyncRequest(), timeout=10)  # the worker's periodic resync, sooner
        return len(secondaries(cloud.ec2, instance_id)) == 2

    poll(given_back, timeout=30, interval=0.5)
    assert time.monotonic() - left >= RELEASE_DELAY_S
    assert api.stats(node).available_ips == 2
