#!/usr/bin/env python3
"""Benchmark of the cloud worker at cluster scale: the EC2 calls and wall time of one full resync.

For each N (100, 300, 1,000 by default) it starts its own redis-server, moto server and allocator
on free 127.0.0.1 ports, runs N m5.large instances in a VPC of their own (run_instances in batches),
gives each two secondary addresses in EC2 directly and registers the nodes (pre_allocate 2), then:

  1. warm-up   a worker at a fast override rate hands the allocator what EC2 holds, then stops;
  2. resync    a fresh worker at the default rate (EC2's buckets, IPAM_EC2_ACCOUNT_SHARE 0.5):
               its first full resync (the instances are new to its view), then a steady one.

EC2 calls by operation come from the worker's own metrics (ipam_worker_ec2_calls_total), the wall
time from ipam_worker_resync_duration_seconds. Prints a table, writes bench/out/scale-<time>.json.

    .venv/bin/python -m bench.scale [--nodes 100 300 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.harness import machine
from ipam.v1 import nodes_pb2 as npb
from services.demo_seed import DEMO_IMAGE_ID, create_demo_network
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import MotoServer, ec2_client
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

OUT = Path(__file__).resolve().parent / "out"
RUN_BATCH = 250  # instances per run_instances
STEADY_INTERVAL_S = 30.0


def samples(worker: WorkerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).read().decode()
    except OSError:  # not listening yet
        return {}
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def calls(worker: WorkerProcess) -> Counter[str]:
    counted: Counter[str] = Counter()
    for labels, value in samples(worker).get("ipam_worker_ec2_calls_total", []):
        counted[labels["operation"]] += int(value)
    return counted


def gauge(worker: WorkerProcess, name: str) -> float:
    return sum(v for _, v in samples(worker).get(name, []))


def all_at_watermark(api: Api) -> bool:
    nodes, request = [], npb.ListNodesRequest()
    while True:
        reply = api.nodes.ListNodes(request, timeout=30)
        nodes += list(reply.nodes)
        token = getattr(reply, "next_page_token", "")  # paged replies: follow every page
        if not token:
            break
        request = npb.ListNodesRequest(page_token=token)
    return bool(nodes) and all(n.stats.needed_ips == 0 and n.stats.available_ips == 2 for n in nodes)


def one_size(moto: MotoServer, nodes: int) -> dict[str, Any]:
    ec2 = ec2_client(moto.endpoint_url)
    network = create_demo_network(ec2, instance_types=())
    print(f"N={nodes}: running instances ...", flush=True)
    instances: list[dict[str, Any]] = []
    while len(instances) < nodes:
        count = min(RUN_BATCH, nodes - len(instances))
        instances += ec2.run_instances(
            ImageId=DEMO_IMAGE_ID,
            MinCount=count,
            MaxCount=count,
            InstanceType="m5.large",
            SubnetId=network.subnet_ids[0],
            SecurityGroupIds=[network.security_group_id],
            Placement={"AvailabilityZone": network.availability_zone},
        )["Instances"]
    for instance in instances:
        eth0 = instance["NetworkInterfaces"][0]["NetworkInterfaceId"]
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eth0, SecondaryPrivateIpAddressCount=2)
    with RedisServer() as redis, AllocatorProcess(redis.url) as allocator:
        api = Api(allocator.address)
        for instance in instances:
            api.create_node(instance_id=instance["InstanceId"], instance_type="m5.large", pre_allocate=2)
        print(f"N={nodes}: warm-up (the allocator learns what EC2 holds) ...", flush=True)
        warm = WorkerProcess(
            redis.url,
            allocator.address,
            moto.endpoint_url,
            ec2_qps=1000,
            ec2_burst=1000,
            check_address_conflicts=False,
        ).start()
        poll(lambda: all_at_watermark(api), timeout=1800, interval=1.0)
        warm.stop()
        print(f"N={nodes}: resync at the default rate ...", flush=True)
        worker = WorkerProcess(
            redis.url,
            allocator.address,
            moto.endpoint_url,
            ec2_qps=0,
            resync_interval_seconds=STEADY_INTERVAL_S,
        ).start()
        try:
            poll(lambda: gauge(worker, "ipam_worker_resync_total") >= 1, timeout=600, interval=0.2)
            first, first_s = calls(worker), gauge(worker, "ipam_worker_resync_duration_seconds")
            poll(lambda: gauge(worker, "ipam_worker_resync_total") >= 2, timeout=600, interval=0.2)
            steady = calls(worker) - first
            steady_s = gauge(worker, "ipam_worker_resync_duration_seconds")
            assert all_at_watermark(api)
        finally:
            worker.stop()
            api.close()
    return {
        "nodes": nodes,
        "first_resync": {"calls": sum(first.values()), "by_operation": dict(first), "seconds": first_s},
        "steady_resync": {"calls": sum(steady.values()), "by_operation": dict(steady), "seconds": steady_s},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 300, 1000])
    args = parser.parse_args()
    results = []
    with MotoServer() as moto:
        for nodes in args.nodes:
            results.append(one_size(moto, nodes))
            r = results[-1]
            print(
                f"N={nodes}: first resync {r['first_resync']['calls']} calls {r['first_resync']['seconds']:.2f} s "
                f"{r['first_resync']['by_operation']}; steady {r['steady_resync']['calls']} calls "
                f"{r['steady_resync']['seconds']:.2f} s {r['steady_resync']['by_operation']}",
                flush=True,
            )
    print("\n| nodes | first resync: EC2 calls | wall s | steady resync: EC2 calls | wall s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['nodes']} | {r['first_resync']['calls']} | {r['first_resync']['seconds']:.2f} "
            f"| {r['steady_resync']['calls']} | {r['steady_resync']['seconds']:.2f} |"
        )
    OUT.mkdir(exist_ok=True)
    path = OUT / f"scale-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
