"""ipamctl's operator commands end to end, against the real allocator and a real worker:
status, node update, resync, events dead / replay, -o json, the config file, a refused connection."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.polling import poll
from tests.support.redis_server import RedisServer, free_port
from tests.support.worker_process import WorkerProcess

WORKER = "ipamctl-test-worker"


@dataclass
class Cluster:
    allocator: AllocatorProcess
    worker: WorkerProcess
    api: Api


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Its own Redis (its events stream and dead letters are this module's alone) and a worker whose
    EC2 endpoint refuses connections: every maintenance fails, so events are dead-lettered."""
    redis = RedisServer().start()
    allocator = AllocatorProcess(redis.url).start()
    worker = WorkerProcess(
        redis.url,
        allocator.address,
        f"http://127.0.0.1:{free_port()}",
        consumer_name=WORKER,
        max_deliveries=1,
        claim_idle_seconds=0.5,
    )
    worker.env["AWS_MAX_ATTEMPTS"] = "1"  # botocore: no retries of the refused connection
    worker.start()
    # Its first resync (of no node yet) done: from now on nodes are maintained on their events.
    poll(lambda: "ipam_worker_resync_total 1.0" in _metrics(worker.metrics_port), timeout=30, interval=0.2)
    api = Api(allocator.address)
    try:
        yield Cluster(allocator, worker, api)
    finally:
        api.close()
        worker.stop()
        allocator.stop()
        redis.close()


def _metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return ""


def ipamctl(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IPAM_")}
    base.update({"IPAM_GRPC_ADDRESS": cluster.allocator.address, "IPAM_TOKEN": ADMIN_TOKEN, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "clients.ipamctl", *args], env=base, capture_output=True, text=True, timeout=30
    )


def _json(result: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_events_dead_lists_a_failed_event_and_replay_puts_it_back(cluster: Cluster) -> None:
    node = cluster.api.create_node(instance_id="i-0123456789abcdef0")  # needs 8; EC2 refuses; the event dies

    def dead_for_node() -> list[dict]:  # type: ignore[type-arg]
        listed = _json(ipamctl(cluster, "events", "dead", "-o", "json"))
        return [e for e in listed.get("events", []) if e["event"]["node"] == node]

    try:
        dead = poll(dead_for_node, timeout=30, interval=0.3)
    except AssertionError:
        raise AssertionError(cluster.worker.log_tail(40)) from None
    assert dead[0]["deliveries"] >= 1
    counted = re.search(r"^ipam_worker_events_dead_lettered_total (\S+)$", _metrics(cluster.worker.metrics_port), re.M)
    assert counted and float(counted.group(1)) >= 1
    text = ipamctl(cluster, "events", "dead")
    assert dead[0]["id"] in text.stdout and node in text.stdout

    replayed = _json(ipamctl(cluster, "events", "replay", dead[0]["id"], "-o", "json"))
    assert replayed["replayed"] == [dead[0]["id"]]
    again = _json(ipamctl(cluster, "events", "dead", "-o", "json"))
    assert dead[0]["id"] not in [e["id"] for e in again.get("events", [])]

    missing = _json(ipamctl(cluster, "events", "replay", "1-1", "-o", "json"))
    assert missing == {"replayed": [], "not_found": ["1-1"]}
    assert ipamctl(cluster, "events", "replay").returncode == 2  # ids or --all


def test_status_shows_allocators_workers_nodes_and_events(cluster: Cluster) -> None:
    # With an instance (a node without one is a dead end: "no-instance"); this worker's EC2 is away.
    in_deficit = cluster.api.create_node(instance_id="i-0123456789abcdef0")
    dead_address = f"127.0.0.1:{free_port()}"
    status = _json(ipamctl(cluster, "status", "-o", "json", "--address", f"{cluster.allocator.address},{dead_address}"))
    reachable = {a["address"]: a["reachable"] for a in status["allocators"]}
    assert reachable == {cluster.allocator.address: True, dead_address: False}
    workers = {w["name"]: w["alive"] for w in status["workers"]}
    assert workers.get(WORKER) is True
    assert in_deficit in status["nodes_by_state"]["in-deficit"]
    assert status["nodes"]["total"] >= 1
    assert set(status["events"]) == {"pending", "dead"}
    assert status["redis"]["mode"] == "single" and status["redis"]["masters"] == 1
    text = ipamctl(cluster, "status")
    assert text.returncode == 0 and "allocators" in text.stdout and WORKER in text.stdout
    assert "in deficit" in text.stdout
    assert "redis  single, master " in text.stdout


def test_node_update_changes_watermarks_and_ipv6_and_keeps_the_rest(cluster: Cluster) -> None:
    node = cluster.api.create_node(subnet_ids=["subnet-1"], release_excess=True)
    updated = _json(
        ipamctl(
            cluster, "node", "update", node, "--pre-allocate", "0", "--max-above-watermark", "4", "--ipv6", "-o", "json"
        )
    )
    spec = updated["spec"]
    assert (spec["pre_allocate"], spec["max_above_watermark"], spec["ipv6_enabled"]) == (0, 4, True)
    assert spec["subnet_ids"] == ["subnet-1"] and spec["release_excess"] is True
    off = _json(ipamctl(cluster, "node", "update", node, "--no-ipv6", "-o", "json"))
    assert off["spec"]["ipv6_enabled"] is False and off["spec"]["pre_allocate"] == 0
    assert ipamctl(cluster, "node", "update", node).returncode == 2  # nothing to change


def test_resync_and_node_show_and_json_objects(cluster: Cluster) -> None:
    node = cluster.api.node_with_pool(5)
    resynced = _json(ipamctl(cluster, "resync", "-o", "json"))
    assert resynced["nodes"] >= 1
    shown = ipamctl(cluster, "node", "show", node)
    assert "free" in shown.stdout and "available (attached)" in shown.stdout
    listed = ipamctl(cluster, "nodes", "list")
    assert listed.stdout.splitlines()[0].split()[:4] == ["NAME", "INSTANCE", "TYPE", "USED"]
    assert "FREE" in listed.stdout.splitlines()[0]
    debug = _json(ipamctl(cluster, "debug-status", "-o", "json"))
    assert isinstance(debug, dict) and debug["lines"][0].startswith("nodes:")


def test_the_token_may_come_from_the_config_file(cluster: Cluster, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(f"token = {ADMIN_TOKEN}\n")
    env = {"IPAM_TOKEN": "", "IPAM_CONFIG": str(config)}
    assert ipamctl(cluster, "nodes", "list", env=env).returncode == 0
    wrong = ipamctl(cluster, "nodes", "list", "--token", "wrong", env=env)  # the flag wins
    assert wrong.returncode == 1 and "INVALID_CREDENTIALS" in wrong.stderr


def test_a_refused_connection_asks_whether_make_run_is_running(cluster: Cluster) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = ipamctl(cluster, "ping", "--address", address, "--timeout", "3")
    assert result.returncode == 1
    assert f"is `make run` running? --address {address}" in result.stderr
