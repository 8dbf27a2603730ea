#!/usr/bin/env python3
"""The CNI plugin (clients/cni) against the reference host-local, on the same machine in one run.

Starts its own redis-server (AOF, `appendfsync always` as the native cluster runs it) and one
allocator on free 127.0.0.1 ports, and gives one node a pool of addresses through the admin API (no
cloud: the ADD path is measured, not a refill). Then, for our plugin and for host-local, ADD then
DEL of `--containers` containers, sequentially and with `--parallel` at once, the two plugins taking
turns (one container each one at a time, a tenth of them each in parallel), each one exec of the
plugin exactly as a main plugin (bridge, ptp) runs its IPAM plugin: network config on stdin,
CNI_* variables. Reported per plugin: ADDs per second, p50/p99 of one ADD (and of one DEL), and the
process start cost (the plugin's VERSION alone, no network); and the ratios ours / host-local.

    .venv/bin/python -m bench.cni --plugin .bin/cni/ipam-cni [--containers 200] [--parallel 8]

`make bench-cni` builds the plugin and runs this. Every figure goes to bench/out/cni-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import ROOT, machine, percentile, start_redis, write_results
from tests.support.allocator_process import CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api

HOST_LOCAL = Path("/usr/lib/cni/host-local")
NETWORK = "bench-cni"


def run_plugin(binary: Path, command: str, conf: str, container_id: str = "") -> float:
    """One exec of the plugin; its wall time in seconds (a failure ends the benchmark)."""
    env = {"CNI_COMMAND": command, "CNI_PATH": str(binary.parent), "PATH": os.environ.get("PATH", "")}
    if container_id:
        env |= {"CNI_CONTAINERID": container_id, "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/bench"}
    started = time.perf_counter()
    done = subprocess.run([str(binary)], input=conf.encode(), env=env, capture_output=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{binary.name} {command} {container_id} failed: {done.stdout!r} {done.stderr!r}")
    return elapsed


@dataclass
class Plugin:
    """One plugin under test: its binary and the network config a main plugin would hand it."""

    name: str
    binary: Path
    conf: str


# The plugins take turns, in rounds of this many containers (one at a time: one container each),
# so that a change in the load of a shared machine during the run hits both alike.
ROUNDS = 10


def _rounds(ids: list[str], parallel: int) -> list[list[str]]:
    size = 1 if parallel == 1 else max(1, len(ids) // ROUNDS)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def add_del(plugins: list[Plugin], containers: int, parallel: int) -> dict[str, dict[str, Any]]:
    """ADD every container, then DEL every one, `parallel` at a time, each plugin in turn per round."""
    ids = {p.name: [f"bench-{p.name}-{parallel}-{i}" for i in range(containers)] for p in plugins}
    times: dict[tuple[str, str], list[float]] = {}
    walls: dict[tuple[str, str], float] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for command in ("ADD", "DEL"):
            batches = {p.name: _rounds(ids[p.name], parallel) for p in plugins}
            for r in range(len(batches[plugins[0].name])):
                for p in plugins:
                    batch = batches[p.name][r]
                    started = time.perf_counter()
                    if parallel == 1:
                        took = [run_plugin(p.binary, command, p.conf, cid) for cid in batch]
                    else:
                        took = list(pool.map(lambda cid, p=p, c=command: run_plugin(p.binary, c, p.conf, cid), batch))
                    walls[p.name, command] = walls.get((p.name, command), 0.0) + time.perf_counter() - started
                    times.setdefault((p.name, command), []).extend(took)
    out = {}
    for p in plugins:
        adds, dels = times[p.name, "ADD"], times[p.name, "DEL"]
        out[p.name] = {
            "parallel": parallel,
            "containers": containers,
            "adds_per_s": containers / walls[p.name, "ADD"],
            "add_p50_ms": percentile(adds, 50) * 1000,
            "add_p99_ms": percentile(adds, 99) * 1000,
            "dels_per_s": containers / walls[p.name, "DEL"],
            "del_p50_ms": percentile(dels, 50) * 1000,
            "del_p99_ms": percentile(dels, 99) * 1000,
        }
    return out


def start_cost(plugins: list[Plugin], runs: int) -> dict[str, dict[str, float]]:
    """VERSION alone, the plugins in turn: the exec, the runtime's start and the reply, with no
    network and no store."""
    conf = json.dumps({"cniVersion": "1.0.0"})
    times: dict[str, list[float]] = {p.name: [] for p in plugins}
    for _ in range(runs):
        for p in plugins:
            times[p.name].append(run_plugin(p.binary, "VERSION", conf))
    return {
        name: {"version_p50_ms": statistics.median(t) * 1000, "version_p99_ms": percentile(t, 99) * 1000}
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", type=Path, default=ROOT / ".bin" / "cni" / "ipam-cni")
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--fsync", default="always", choices=["always", "everysec", "no"])
    args = parser.parse_args(argv)
    plugin = args.plugin.resolve()
    for binary in (plugin, HOST_LOCAL):
        if not os.access(binary, os.X_OK):
            print(f"{binary} is missing: run `make bench-cni`", file=sys.stderr)
            return 1

    results: dict[str, Any] = {"machine": machine(), "containers": args.containers, "fsync": args.fsync}
    with tempfile.TemporaryDirectory(prefix="ipam-bench-cni-") as tmp:
        redis_server = start_redis(args.fsync)
        allocator = AllocatorProcess(redis_server.url, log_level="WARNING").start()
        api = Api(allocator.address)
        try:
            node = api.create_node(pre_allocate=0, pre_allocate_set=True)
            api.seed(node, v4=args.containers + 16)
            token = Path(tmp) / "token"
            token.write_text(CLIENT_TOKEN)
            ours = json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": NETWORK,
                    "type": "bridge",
                    "ipam": {
                        "type": plugin.name,
                        "allocator": allocator.address,
                        "tokenFile": str(token),
                        "node": node,
                    },
                }
            )
            host_local = json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": NETWORK,
                    "type": "bridge",
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.20.0.0/16"}]],
                        "dataDir": str(Path(tmp) / "host-local"),
                    },
                }
            )
            plugins = [Plugin("ours", plugin, ours), Plugin("host-local", HOST_LOCAL, host_local)]
            for name, entry in start_cost(plugins, 50).items():
                results[name] = dict(entry)
            for parallel in (1, args.parallel):
                for name, figures in add_del(plugins, args.containers, parallel).items():
                    results[name][f"p{parallel}"] = figures
        finally:
            api.close()
            allocator.stop()
            redis_server.close()

    ours, ref = results["ours"], results["host-local"]
    ratios = {}
    for parallel in (1, args.parallel):
        o, h = ours[f"p{parallel}"], ref[f"p{parallel}"]
        ratios[f"p{parallel}"] = {
            "add_p50": o["add_p50_ms"] / h["add_p50_ms"],
            "add_p99": o["add_p99_ms"] / h["add_p99_ms"],
            "adds_per_s": o["adds_per_s"] / h["adds_per_s"],
        }
    results["ratios_ours_over_host_local"] = ratios

    info = results["machine"]
    print(f"{args.containers} containers, ADD then DEL; machine: {info['cpu']}, {info['nproc']} CPUs")
    print(f"{'plugin':<11} {'callers':>7} {'ADD/s':>8} {'ADD p50':>9} {'ADD p99':>9} {'DEL/s':>8} {'VERSION p50':>12}")
    for name in ("ours", "host-local"):
        for parallel in (1, args.parallel):
            r = results[name][f"p{parallel}"]
            print(
                f"{name:<11} {parallel:>7} {r['adds_per_s']:>8.1f} {r['add_p50_ms']:>7.2f}ms {r['add_p99_ms']:>7.2f}ms "
                f"{r['dels_per_s']:>8.1f} {results[name]['version_p50_ms']:>10.2f}ms"
            )
    for parallel in (1, args.parallel):
        r = ratios[f"p{parallel}"]
        print(
            f"ours / host-local, {parallel} at a time: ADD p50 {r['add_p50']:.2f}x, p99 {r['add_p99']:.2f}x, "
            f"ADD/s {r['adds_per_s']:.2f}x (target: ADD latency within 1.5x)"
        )
    start_share = ours["version_p50_ms"] / ours["p1"]["add_p50_ms"]
    print(f"our process start (VERSION) is {start_share:.0%} of our sequential ADD p50")
    results["ours_start_share_of_add_p50"] = start_share

    path = write_results(ROOT / "bench" / "out", "cni", results)
    print(f"figures in {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
