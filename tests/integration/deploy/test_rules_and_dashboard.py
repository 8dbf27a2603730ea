"""deploy/: the alert rules pass promtool, and every metric a rule or a dashboard panel names is one
the running allocator and worker export (scraped from the real processes)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import MotoServer
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "ipam-dashboard.json"
_NAME = re.compile(r"\b((?:ipam|process|python)_[a-zA-Z0-9_]+)\b")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def test_the_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make setup installs it)"
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _expressions() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    found = {f"rule {r['alert']}": r["expr"] for group in rules["groups"] for r in group["rules"]}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    return found


def _exported(text: str) -> set[str]:
    """Every sample name a scrape may carry: each family's name and, for histograms, its series."""
    names = set()
    for name, kind in _TYPE.findall(text):
        names.add(name)
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    return names


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """The module's own: on the session's, the worker would resync every node earlier tests left
    there, and the allocator export them all."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def services(redis: RedisServer) -> Iterator[tuple[AllocatorProcess, WorkerProcess]]:
    with MotoServer() as moto, AllocatorProcess(redis.url, pool_metrics_seconds=0.5) as allocator:
        worker = WorkerProcess(redis.url, allocator.address, moto.endpoint_url).start()
        try:
            yield allocator, worker
        finally:
            worker.stop()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def test_every_metric_the_rules_and_panels_name_is_exported(services: tuple[AllocatorProcess, WorkerProcess]) -> None:
    allocator, worker = services
    # The cluster-wide gauges appear once each service's process holds the exporter lease.
    poll(lambda: 'ipam_cluster_exporter{service="allocator"} 1.0' in _scrape(allocator.metrics_port), timeout=20)
    poll(lambda: 'ipam_cluster_exporter{service="worker"} 1.0' in _safe_scrape(worker.metrics_port), timeout=30)
    exported = _exported(_scrape(allocator.metrics_port)) | _exported(_scrape(worker.metrics_port))
    expressions = _expressions()
    assert len(expressions) > 20
    missing = {where: sorted(set(_NAME.findall(expr)) - exported) for where, expr in expressions.items()}
    assert {where: names for where, names in missing.items() if names} == {}
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "ipam_build_info"):
        assert name in exported


def _safe_scrape(port: int) -> str:
    try:
        return _scrape(port)
    except OSError:
        return ""


def _pool_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ipam_allocator_pool_ips{")]


def test_one_allocator_replica_exports_the_pool_gauges_and_another_takes_over(
    services: tuple[AllocatorProcess, WorkerProcess], redis: RedisServer
) -> None:
    """With two replicas a plain sum() counts each pool once: only the lease holder exports them."""
    first, _ = services
    api = Api(first.address)
    node = api.node_with_pool(3)
    api.close()
    with AllocatorProcess(redis.url, pool_metrics_seconds=0.5) as second:
        poll(lambda: any(node in line for line in _pool_series(_scrape(first.metrics_port))), timeout=20)
        scrapes = [_scrape(first.metrics_port), _scrape(second.metrics_port)]
        assert 'ipam_cluster_exporter{service="allocator"} 1.0' in scrapes[0]
        assert 'ipam_cluster_exporter{service="allocator"} 0.0' in scrapes[1]
        assert _pool_series(scrapes[1]) == []
        first.stop()
        try:
            # The lease (5 s) expires and the second replica exports the pools now.
            poll(lambda: any(node in line for line in _pool_series(_scrape(second.metrics_port))), timeout=20)
        finally:
            first.start()  # for the module's worker
