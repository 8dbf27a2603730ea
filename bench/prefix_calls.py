#!/usr/bin/env python3
"""EC2 mutating calls per 1,000 pods started, in prefix mode and with secondary addresses.

For each mode it starts its own redis-server, the local EC2 (which delegates /28 prefixes as EC2
does), an allocator and one worker (IPAM_PREFIX_DELEGATION true or false, a fast EC2 rate override
so that the budget does not pace the run), runs N m5.large nodes at pre_allocate 8, then starts
pods one after another, round robin over the nodes, each an AllocateNext with wait_for_refill,
with a pause between two (pods arriving at a steady rate, not all at once: bench/scale.py has the
burst). The mutating calls come from the worker's own metrics (ipam_worker_cloud_calls_total by
operation), counted from the first pod until the worker is idle again.

Prints the table and the ratio, writes bench/out/prefix-calls-<time>.json.

    .venv/bin/python -m bench.prefix_calls [--nodes 50] [--pods 1000] [--interval 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench import burst as burst_bench
from bench.harness import machine
from bench.scale import OUT, calls, idle_both
from clients.client import AsyncIpamClient, Family
from tests.support.allocator_process import CLIENT_TOKEN, AllocatorProcess
from tests.support.moto_server import MotoServer, create_demo_network, ec2_client, run_instance
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

MUTATING = (
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "ModifyNetworkInterfaceAttribute",
    "DeleteNetworkInterface",
)


async def start_pods(address: str, names: list[str], pods: int, interval: float) -> float:
    """Starts `pods` pods one after another, round robin over the nodes; returns the seconds taken."""
    started = time.monotonic()
    async with AsyncIpamClient(address, CLIENT_TOKEN, timeout=120) as client:
        for i in range(pods):
            await client.allocate_next(
                names[i % len(names)], family=Family.IPV4, owner=f"pod-{i}", wait_for_refill=True
            )
            await asyncio.sleep(interval)
    return time.monotonic() - started


def one_mode(prefixes: bool, nodes: int, pods: int, interval: float) -> dict[str, Any]:
    cfg = burst_bench.BurstConfig(
        nodes=nodes,
        allocations=pods,
        instance_type="m5.large",
        pre_allocate=8,
        max_above_watermark=0,
        channels=1,
        deadline_s=120.0,
        ec2_qps=200,
        ec2_burst=200,
        worker_settings={},
        out_dir=OUT,
    )
    with MotoServer(local_ec2=True) as moto, RedisServer() as redis, AllocatorProcess(redis.url) as allocator:
        ec2 = ec2_client(moto.endpoint_url)
        network = create_demo_network(ec2, instance_types=())
        instances = [run_instance(ec2, network, cfg.instance_type) for _ in range(nodes)]
        worker = WorkerProcess(
            redis.url,
            allocator.address,
            moto.endpoint_url,
            ec2_qps=200,
            ec2_burst=200,
            gc_interval_seconds=3600,
            prefix_delegation=str(prefixes).lower(),
        ).start()
        try:
            names = asyncio.run(burst_bench.register_nodes(allocator.address, cfg, network, instances))
            asyncio.run(burst_bench.wait_at_watermark(allocator.address, names, cfg.pre_allocate, 300))
            idle_both(redis, [worker])
            before = calls(worker)
            seconds = asyncio.run(start_pods(allocator.address, names, pods, interval))
            idle_both(redis, [worker])
            made = calls(worker) - before
        finally:
            worker.stop()
    mutating = {op: int(made[op]) for op in MUTATING if made[op]}
    total = sum(mutating.values())
    return {
        "mode": "prefixes" if prefixes else "secondaries",
        "pods": pods,
        "nodes": nodes,
        "seconds": round(seconds, 2),
        "mutating_by_operation": mutating,
        "mutating_per_1000_pods": round(1000 * total / pods, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=50, help="m5.large nodes (27 pods each at most without prefixes)")
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two pods")
    args = parser.parse_args()
    results = [one_mode(prefixes, args.nodes, args.pods, args.interval) for prefixes in (False, True)]
    ratio = results[1]["mutating_per_1000_pods"] / results[0]["mutating_per_1000_pods"]
    print("\n| mode | EC2 mutating calls per 1,000 pods | by operation | pods started in (s) |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['mutating_per_1000_pods']} | {r['mutating_by_operation']} | {r['seconds']} |")
    print(f"prefix mode ÷ secondaries: {ratio:.3f} (target ≤ 0.1)")
    OUT.mkdir(exist_ok=True)
    path = OUT / f"prefix-calls-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"machine": machine(), "results": results, "ratio": ratio}, indent=2))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
