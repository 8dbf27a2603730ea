"""The whole cluster as `make run` starts it (docker-compose.yml's definitions as local processes,
on free ports): a restart keeps nodes, allocations and the local EC2 behind them; 2,000 allocations over both allocator replicas while one allocator and one worker
are killed; every acknowledged allocation ends present exactly once and EC2 matches the pools."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.client import AsyncIpamClient, Family, IpamClient, IpamClientError, node_spec
from dev.demo_seed import POD_SUBNET_TAGS, find_demo_network, run_instance
from dev.devcluster import ROOT, NativeCluster, load_compose, native_services
from tests.support.moto_server import ec2_client
from tests.support.polling import poll
from tests.support.redis_server import free_port, require_redis_server

ALLOCATIONS = 2000
CALLERS = 40
ADMIN, CLIENT = "change-me-admin", "change-me-client"  # .env.example's tokens
# The integration tests' worker timing, not the defaults: a killed worker's event is claimed after
# 2 s (not 15) and its node locks free after 5 s (not 20), which the last poll otherwise waits out.
WORKER_TIMING = {"IPAM_CLAIM_IDLE_SECONDS": "2", "IPAM_NODE_LOCK_SECONDS": "5", "IPAM_HEARTBEAT_SECONDS": "6"}


class Running:
    """The cluster of this module; a test may stop it and start it again on the same data."""

    def __init__(self, var: Path) -> None:
        self.var = var
        self.ports = {port: free_port() for port in (6379, 5000, 50051, 9100, 9200)}
        self.services = native_services(
            load_compose(), env_file=ROOT / ".env.example", data_dir=var / "data", port_map=self.ports
        )
        self.native = NativeCluster(self.services, var / "log", extra_env=WORKER_TIMING)

    def restart(self) -> None:
        self.native.stop()
        self.native = NativeCluster(self.services, self.var / "log", extra_env=WORKER_TIMING)
        self.native.start()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    require_redis_server()
    run = Running(tmp_path_factory.mktemp("native"))
    try:
        run.native.start()
        yield run
    finally:
        run.native.stop()


@pytest.fixture
def cluster(running: Running) -> tuple[NativeCluster, dict[int, int]]:
    return running.native, running.ports


def _state(admin: IpamClient) -> dict[str, tuple[str, dict[str, str], list[str]]]:
    """Per node: its instance, its allocations and the interfaces' addresses."""
    return {
        node.spec.name: (
            node.spec.instance_id,
            dict(admin.dump(node.spec.name).ipv4),
            sorted(ip for i in node.interfaces for ip in i.addresses),
        )
        for node in admin.list_nodes()
    }


@pytest.mark.timeout(240)
def test_a_restart_keeps_the_nodes_their_allocations_and_the_cloud_behind_them(running: Running) -> None:
    address = f"127.0.0.1:{running.ports[50051]}"
    ec2_url = f"http://127.0.0.1:{running.ports[5000]}"
    demo_nodes = [n for n in IpamClient(address, token=ADMIN).list_nodes() if n.spec.name.startswith("node-")]
    assert demo_nodes, "the seed registered the demo nodes"
    with IpamClient(address, token=CLIENT) as client:
        client.allocate_next(
            demo_nodes[0].spec.name, family=Family.IPV4, owner="kept-1", wait_for_refill=True, timeout=30
        )
    with IpamClient(address, token=ADMIN) as admin:

        def settled() -> bool:  # no refill or release under way
            return all(n.stats.needed_ips == 0 and n.stats.excess_ips == 0 for n in admin.list_nodes())

        poll(settled, timeout=60, interval=0.5)
        before = _state(admin)

    running.restart()

    seed_log = (running.var / "log" / "seed-1.log").read_text()
    assert "its instance is gone" not in seed_log
    for node in demo_nodes:  # the seed found the demo network and its nodes as they were
        assert f"{node.spec.name} already registered" in seed_log
    with IpamClient(address, token=ADMIN) as admin:
        after = _state(admin)
    assert after == before
    ec2 = ec2_client(ec2_url)
    for name, (instance_id, _, addresses) in before.items():
        reply = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])
        in_ec2 = sorted(
            a["PrivateIpAddress"]
            for i in reply["NetworkInterfaces"]
            for a in i["PrivateIpAddresses"]
            if not a["Primary"]
        )
        assert set(addresses) <= set(in_ec2), name  # what the pools hold is still attached in the cloud
    # Each allocator replica named itself.
    assert "allocator 2 listening" in (running.var / "log" / "allocator-2.log").read_text()


def _kill(process) -> None:  # type: ignore[no-untyped-def]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


async def _allocate_all(address: str, nodes: list[str], halfway: asyncio.Event) -> dict[str, tuple[str, str]]:
    """Every call has its own idempotency key, so a retry after a killed replica is exact."""
    clients = [AsyncIpamClient(address, token=CLIENT, timeout=60) for _ in range(8)]  # 8 connections
    acknowledged: dict[str, tuple[str, str]] = {}
    failures: dict[str, str] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(ALLOCATIONS):
        queue.put_nowait(i)

    async def caller(index: int) -> None:
        client = clients[index % len(clients)]
        while not queue.empty():
            i = queue.get_nowait()
            node, owner = nodes[i % len(nodes)], f"e2e-{i}"
            for attempt in range(20):
                try:
                    reply = await client.allocate_next(
                        node, family=Family.IPV4, owner=owner, idempotency_key=owner, wait_for_refill=True, timeout=60
                    )
                    acknowledged[owner] = (node, reply.ipv4.ip)
                    failures.pop(owner, None)
                    break
                except IpamClientError as exc:
                    failures[owner] = str(exc)
                    if exc.code.name not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"):
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            if len(acknowledged) >= ALLOCATIONS // 2:
                halfway.set()

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    for client in clients:
        await client.close()
    assert failures == {}
    return acknowledged


@pytest.mark.timeout(420)
def test_allocations_survive_killing_an_allocator_and_a_worker(cluster: tuple[NativeCluster, dict[int, int]]) -> None:
    native, ports = cluster
    address = f"127.0.0.1:{ports[50051]}"
    ec2 = ec2_client(f"http://127.0.0.1:{ports[5000]}")
    network = find_demo_network(ec2)
    assert network is not None, "the seed service created the demo network"
    assert len(native.replicas("allocator")) == 2 and len(native.replicas("worker")) == 2

    # Three large nodes (m5.24xlarge: 15 interfaces x 50 IPv4 = 735 usable each) for 2,000 addresses.
    with IpamClient(address, token=ADMIN) as admin:
        nodes = {}
        for index in range(3):
            instance_id = run_instance(ec2, network, "m5.24xlarge")
            name = f"e2e-{index}"
            admin.create_node(
                node_spec(
                    name,
                    instance_id=instance_id,
                    instance_type="m5.24xlarge",
                    subnet_tags=POD_SUBNET_TAGS,
                    pre_allocate=50,
                    max_above_watermark=50,
                )
            )
            nodes[name] = instance_id

    async def drive() -> dict[str, tuple[str, str]]:
        halfway = asyncio.Event()
        work = asyncio.create_task(_allocate_all(address, list(nodes), halfway))
        await halfway.wait()
        _kill(native.replicas("allocator")[0])
        _kill(native.replicas("worker")[0])
        return await work

    acknowledged = asyncio.run(drive())
    assert len(acknowledged) == ALLOCATIONS

    with IpamClient(address, token=ADMIN) as admin:
        for node in nodes:
            dump = admin.dump(node)
            expected = {ip: owner for owner, (n, ip) in acknowledged.items() if n == node}
            # Exactly once: every acknowledged address held by its owner, and nothing else held.
            assert dict(dump.ipv4) == expected

        difference: dict[str, object] = {}

        def ec2_matches_pools() -> bool:
            # What a killed worker assigned but never reported is found when its event is claimed
            # (after the claim idle time and the node lock's lease): poll for it.
            for node, instance_id in nodes.items():
                dump = admin.dump(node)
                reply = ec2.describe_network_interfaces(
                    Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
                )
                in_ec2 = [
                    a["PrivateIpAddress"]
                    for i in reply["NetworkInterfaces"]
                    for a in i["PrivateIpAddresses"]
                    if not a["Primary"]
                ]
                pool = set(dump.ipv4) | set(dump.free_ipv4)
                if len(in_ec2) != len(set(in_ec2)) or set(in_ec2) != pool:
                    difference.update(
                        node=node,
                        only_in_ec2=sorted(set(in_ec2) - pool),
                        only_in_pool=sorted(pool - set(in_ec2)),
                        twice_in_ec2=sorted({ip for ip in in_ec2 if in_ec2.count(ip) > 1}),
                    )
                    return False
            return True

        poll(
            ec2_matches_pools,
            timeout=120,
            interval=1.0,
            describe=lambda: f"EC2 and the pools still differ: {difference}",
        )
    assert len({ip for _, ip in acknowledged.values()}) == ALLOCATIONS
