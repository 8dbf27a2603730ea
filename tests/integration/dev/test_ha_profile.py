"""The ha profile's Redis part, run natively from docker-compose.yml as `make run-ha` runs it: the
Sentinels (their start-up script, through `sh`) name redis the master and see its replica."""

from __future__ import annotations

from pathlib import Path

import redis

from dev.devcluster import ROOT, NativeCluster, load_compose, native_services
from tests.support.polling import poll
from tests.support.redis_server import free_port, require_redis_server

REDIS_SERVICES = {"redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}


def test_the_sentinels_of_the_ha_profile_watch_redis_and_its_replica(tmp_path: Path) -> None:
    require_redis_server()
    ports = {port: free_port() for port in (6379, 6380, 26379, 26380, 26381)}
    services = [
        s
        for s in native_services(
            load_compose(), env_file=ROOT / ".env.example", data_dir=tmp_path / "data", port_map=ports, profiles=["ha"]
        )
        if s.name in REDIS_SERVICES
    ]
    (tmp_path / "log").mkdir()
    cluster = NativeCluster(services, tmp_path / "log")
    try:
        cluster.start()  # each in turn once healthy (compose's health checks)
        for port in (ports[26379], ports[26380], ports[26381]):
            with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as sentinel:

                def sees_both(sentinel: redis.Redis = sentinel) -> bool:
                    master = sentinel.sentinel_master("ipam")
                    return master["port"] == ports[6379] and master["num-slaves"] == 1

                poll(sees_both, timeout=15)
        # Each Sentinel wrote its config once, in its volume's folder, and keeps it.
        for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
            assert "sentinel monitor ipam 127.0.0.1" in (tmp_path / "data" / name / "sentinel.conf").read_text()
    finally:
        cluster.stop()
