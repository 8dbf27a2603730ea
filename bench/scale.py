#!/usr/bin/env python3
"""Benchmark of the cloud worker at cluster scale: one full resync, and a burst on two replicas.

Resync. For each N (100, 300, 1,000 by default) it starts its own redis-server, moto server and allocator
on free 127.0.0.1 ports, runs N m5.large instances in a VPC of their own (run_instances in batches),
gives each two secondary addresses in EC2 directly and registers the nodes (pre_allocate 2), then:

  1. warm-up   a worker at a fast override rate hands the allocator what EC2 holds, then stops;
  2. resync    a fresh worker at the default rate (EC2's buckets, IPAM_EC2_ACCOUNT_SHARE 0.5):
               its first full resync (the instances are new to its view), then a steady one.

EC2 calls by operation come from the worker's own metrics (ipam_worker_cloud_calls_total), the wall
time from ipam_worker_resync_duration_seconds.

Burst. 20 m5.xlarge nodes at their watermark (pre_allocate 8), two worker replicas at the default
rate (EC2's buckets at IPAM_EC2_ACCOUNT_SHARE 0.5, kept in one Redis), then 1,000 AllocateNext
(wait_for_refill) at once, spread evenly. Measured: the time until all succeed against its floor,
the Describe calls per mutating call, and the EC2 calls per second of each replica, with the most
that both together made in any 10 s window in each bucket. Both replicas' metrics
(ipam_worker_cloud_calls_total) are scraped every SAMPLE_S; the floor is the fewest mutating calls
the final EC2 state needed (create, attach and DeleteOnTermination per new interface, one assign
per grown one), each taken from its own bucket full at the start: the slowest bucket's
(calls - burst) / rate. The same count divided by the mutating category's rate alone is given
too (the definition that ignores the per-action buckets).

With --prefix-delegation the burst runs twice on the local EC2 (which delegates /28 prefixes as
EC2 does), with secondary addresses and then in prefix mode (IPAM_PREFIX_DELEGATION), and the EC2
mutating calls per 1,000 allocations of each mode and their ratio are printed.

Prints the tables, writes bench/out/scale-<time>.json.

    .venv/bin/python -m bench.scale [--nodes 100 300 1000] [--skip-resync] [--skip-burst]
        [--worker-setting check_address_conflicts=false] [--prefix-delegation]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import burst as burst_bench
from bench.harness import SampleKey, counter_total, machine, metric_samples, metrics_url, scrape
from dev.demo_seed import DEMO_IMAGE_ID, create_demo_network, run_instance
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker.providers.aws import Ec2Budget, is_read
from services.cloudworker.settings import WorkerSettings
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import MotoServer, ec2_client
from tests.support.polling import poll
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

OUT = Path(__file__).resolve().parent / "out"
RUN_BATCH = 250  # instances per run_instances
STEADY_INTERVAL_S = 30.0
SAMPLE_S = 0.25  # the burst's metrics sampling period
WINDOW_S = 10.0
# What the fewest mutating calls of a burst are, by operation, per new interface or grown one.
PER_NEW_INTERFACE = ("CreateNetworkInterface", "AttachNetworkInterface", "ModifyNetworkInterfaceAttribute")
BURST_TARGET = 1.3  # x its floor
DESCRIBE_TARGET = 0.1  # per mutating call


def samples(worker: WorkerProcess) -> dict[SampleKey, float]:
    """Every sample the worker exports ({} while it is not listening yet)."""
    try:
        return metric_samples(scrape(metrics_url(worker), timeout=10))
    except OSError:
        return {}


def calls(worker: WorkerProcess) -> Counter[str]:
    """Operation -> EC2 calls so far, from the worker's own counter."""
    counted: Counter[str] = Counter()
    for (operation, _), value in calls_by_bucket(worker).items():
        counted[operation] += value
    return counted


def gauge(worker: WorkerProcess, name: str) -> float:
    return counter_total(samples(worker), name)


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


# --- the burst on two replicas -------------------------------------------------------------------


def calls_by_bucket(worker: WorkerProcess) -> Counter[tuple[str, str]]:
    """(operation, bucket) -> calls so far, from the worker's own counter."""
    counted: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples(worker).items():
        if name == "ipam_worker_cloud_calls_total":
            named = dict(labels)
            counted[(named["operation"], named["bucket"])] += int(value)
    return counted


class Sampler:
    """Scrapes every worker's EC2 calls every SAMPLE_S in a thread: (time, one counter per worker)."""

    def __init__(self, workers: list[WorkerProcess]) -> None:
        self.workers = workers
        self.points: list[tuple[float, list[Counter[tuple[str, str]]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.points.append((time.monotonic(), [calls_by_bucket(w) for w in self.workers]))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def max_in_window(points: list[tuple[float, int]], window: float) -> tuple[int, float]:
    """The most calls between two samples at most `window` apart (cumulative counts), and when
    (seconds after the first sample)."""
    best, at, j = 0, 0.0, 0
    for t, count in points:
        while points[j][0] < t - window - 1e-9:
            j += 1
        if count - points[j][1] > best:
            best, at = count - points[j][1], points[j][0] - points[0][0]
    return best, at


def idle_both(redis: RedisServer, workers: list[WorkerProcess]) -> None:
    """Until no event is left and neither worker's EC2 counters moved for a second."""
    previous = None
    while True:
        now = [calls_by_bucket(w) for w in workers]
        if now == previous and burst_bench.worker_idle(redis):
            return
        previous = now
        time.sleep(1.0)


def burst_two_replicas(moto: MotoServer, nodes: int, allocations: int, settings: dict[str, str]) -> dict[str, Any]:
    cfg = burst_bench.BurstConfig(
        nodes=nodes,
        allocations=allocations,
        instance_type="m5.xlarge",
        pre_allocate=8,
        max_above_watermark=0,
        channels=4,
        deadline_s=300.0,
        ec2_qps=0,
        ec2_burst=20,
        worker_settings=settings,
        out_dir=OUT,
    )
    ec2 = ec2_client(moto.endpoint_url)
    network = create_demo_network(ec2, instance_types=())
    instances = [run_instance(ec2, network, cfg.instance_type) for _ in range(nodes)]
    defaults = WorkerSettings()
    budget = Ec2Budget(defaults.ec2_account_share)
    with RedisServer() as redis, AllocatorProcess(redis.url) as allocator:
        workers = [
            WorkerProcess(
                redis.url, allocator.address, moto.endpoint_url, ec2_qps=0, gc_interval_seconds=3600, **settings
            ).start()
            for _ in range(2)
        ]
        try:
            print(f"burst: {nodes} nodes to their watermark, two workers at the default rate ...", flush=True)
            names = asyncio.run(burst_bench.register_nodes(allocator.address, cfg, network, instances))
            asyncio.run(burst_bench.wait_at_watermark(allocator.address, names, cfg.pre_allocate, 300))
            idle_both(redis, workers)
            full_after = max(b.burst / b.rate for b in budget.buckets())
            print(f"burst: {full_after:.0f} s for every bucket to fill up again ...", flush=True)
            time.sleep(full_after)
            before_ec2 = burst_bench.attached_interfaces(ec2, instances)
            print(f"burst: {allocations} AllocateNext at once ...", flush=True)
            with Sampler(workers) as sampler:
                started = time.monotonic()
                stats = asyncio.run(burst_bench.burst(allocator.address, names, cfg))
                idle_both(redis, workers)
                idle_s = time.monotonic() - started
            after_ec2 = burst_bench.attached_interfaces(ec2, instances)
        finally:
            for worker in workers:
                worker.stop()
    if stats.ok < allocations:
        raise RuntimeError(f"{stats.ok} of {allocations} allocations succeeded: {stats.errors} {stats.error_samples}")
    return burst_figures(cfg, budget, stats, sampler.points, started, idle_s, before_ec2, after_ec2)


def burst_figures(
    cfg: burst_bench.BurstConfig,
    budget: Ec2Budget,
    stats: burst_bench.CallStats,
    points: list[tuple[float, list[Counter[tuple[str, str]]]]],
    started: float,
    idle_s: float,
    before_ec2: dict[str, dict[str, int]],
    after_ec2: dict[str, dict[str, int]],
) -> dict[str, Any]:
    first = points[0][1]
    made = [[counted - first[i] for i, counted in enumerate(per_worker)] for _, per_worker in points]
    last = made[-1]
    total: Counter[tuple[str, str]] = sum(last, Counter())
    mutating = sum(n for (op, _), n in total.items() if not is_read(op))
    describes = sum(n for (op, _), n in total.items() if is_read(op))
    minimum = burst_bench.minimum_calls(before_ec2, after_ec2)
    needed = Counter({op: minimum["interfaces_created"] for op in PER_NEW_INTERFACE})
    needed["AssignPrivateIpAddresses"] += minimum["assign_on_existing"]
    by_bucket: Counter[str] = Counter()
    for op, n in needed.items():
        by_bucket[budget.bucket_for(op).name] += n
    sizes = {b.name: b for b in budget.buckets()}
    floor_s = max(max(n - sizes[name].burst, 0.0) / sizes[name].rate for name, n in by_bucket.items())
    mutating_rate = budget.bucket_for("AttachNetworkInterface").rate  # the mutating category's
    category_floor_s = minimum["total"] / mutating_rate
    span = points[-1][0] - points[0][0]
    windows = {}
    for name, size in sizes.items():
        series = [
            (t, sum(n for w in per_worker for (_, bucket), n in w.items() if bucket == name))
            for (t, _), per_worker in zip(points, made, strict=True)
        ]
        most, at = max_in_window(series, WINDOW_S)
        if most:
            windows[name] = {
                "most_in_10s": most,
                "at_s": round(at, 1),
                "rate_x10s": size.rate * WINDOW_S,
                "burst_plus_rate_x10s": size.burst + size.rate * WINDOW_S,
            }
    timeline: dict[str, list[int]] = {}  # operation -> calls of both replicas in each second of the burst
    for t, per_worker in zip((t for t, _ in points), made, strict=True):
        second = int(t - started)
        for (op, _), n in sum(per_worker, Counter()).items():
            row = timeline.setdefault(op, [])
            row.extend([row[-1] if row else 0] * (second + 1 - len(row)))
            row[second] = n
    per_second = {op: [b - a for a, b in zip([0, *row], row, strict=False)] for op, row in sorted(timeline.items())}
    return {
        "nodes": cfg.nodes,
        "allocations": cfg.allocations,
        "worker_settings": cfg.worker_settings,
        "calls_per_second": per_second,
        "all_succeeded_s": round(stats.wall_s, 2),
        "idle_after_s": round(idle_s, 2),
        "p50_s": round(stats.p50_s, 2),
        "minimum": minimum,
        "minimum_by_bucket": dict(by_bucket),
        "floor_s": round(floor_s, 2),
        "floor_category_s": round(category_floor_s, 2),
        "ratio_to_floor": round(stats.wall_s / floor_s, 2) if floor_s else math.nan,
        "mutating_calls": mutating,
        "describe_calls": describes,
        "describe_per_mutating": round(describes / mutating, 3) if mutating else math.nan,
        "calls_by_operation": {f"{op} ({bucket})": n for (op, bucket), n in sorted(total.items())},
        "per_replica": [
            {
                "calls": sum(counted.values()),
                "mutating": sum(n for (op, _), n in counted.items() if not is_read(op)),
                "per_s": round(sum(counted.values()) / span, 2) if span else math.nan,
            }
            for counted in last
        ],
        "sampled_s": round(span, 1),
        "windows": windows,
        "buckets": {b.name: {"burst": b.burst, "rate": b.rate} for b in budget.buckets()},
        "non_mutating_rate": budget.bucket_for("DescribeNetworkInterfaces", {"Filters": []}).rate,
        "targets": {
            "burst_vs_floor": stats.wall_s <= BURST_TARGET * floor_s,
            "describe_per_mutating": mutating > 0 and describes / mutating <= DESCRIBE_TARGET,
            "two_replicas_within_each_bucket": all(
                w["most_in_10s"] <= w["burst_plus_rate_x10s"] for w in windows.values()
            ),
        },
    }


def print_burst(b: dict[str, Any]) -> None:
    extra = "".join(f" IPAM_{k.upper()}={v}" for k, v in b["worker_settings"].items())
    print(
        f"\nburst{extra}: {b['allocations']} AllocateNext over {b['nodes']} nodes, two replicas: all succeeded in "
        f"{b['all_succeeded_s']} s; floor {b['floor_s']} s (slowest bucket; {b['minimum']['total']} mutating calls "
        f"at the mutating category's rate alone: {b['floor_category_s']} s) -> {b['ratio_to_floor']} x "
        f"(target <= {BURST_TARGET})"
    )
    print(
        f"burst: {b['describe_calls']} Describe for {b['mutating_calls']} mutating calls = "
        f"{b['describe_per_mutating']} (target <= {DESCRIBE_TARGET}); per replica "
        + ", ".join(f"{r['calls']} calls ({r['mutating']} mutating) {r['per_s']}/s" for r in b["per_replica"])
        + f" over {b['sampled_s']} s"
    )
    print("| bucket | both replicas, most calls in 10 s | rate x 10 s | burst + rate x 10 s |")
    print("|---|---|---|---|")
    for name, w in b["windows"].items():
        print(
            f"| {name} | {w['most_in_10s']} (from {w['at_s']} s) | {w['rate_x10s']:g} | {w['burst_plus_rate_x10s']:g} |"
        )
    print(f"targets: {b['targets']}")


def compare_prefix_delegation(
    moto: MotoServer, nodes: int, allocations: int, settings: dict[str, str]
) -> dict[str, Any]:
    """The burst with secondary addresses, then in prefix mode: EC2 mutating calls per 1,000
    allocations of each, their ratio, and the time until all allocations succeeded."""
    modes = {}
    for mode, value in (("secondaries", "false"), ("prefixes", "true")):
        modes[mode] = burst_two_replicas(moto, nodes, allocations, {**settings, "prefix_delegation": value})
        print_burst(modes[mode])
    per_1000 = {mode: 1000 * b["mutating_calls"] / b["allocations"] for mode, b in modes.items()}
    ratio = per_1000["prefixes"] / per_1000["secondaries"]
    print("\n| mode | EC2 mutating calls per 1,000 allocations | all succeeded in (s) |")
    print("|---|---|---|")
    for mode, b in modes.items():
        print(f"| {mode} | {per_1000[mode]:.1f} | {b['all_succeeded_s']:.2f} |")
    print(f"prefix mode ÷ secondaries: {ratio:.3f} (target ≤ 0.1)")
    return {"modes": modes, "mutating_per_1000": per_1000, "ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--skip-resync", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--burst-nodes", type=int, default=20)
    parser.add_argument("--allocations", type=int, default=1000)
    parser.add_argument(
        "--prefix-delegation",
        action="store_true",
        help="run the burst with secondaries and in prefix mode, on the local EC2, and compare their EC2 calls",
    )
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the burst's workers, e.g. check_address_conflicts=false",
    )
    args = parser.parse_args()
    settings = {}
    for item in args.worker_setting:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--worker-setting takes NAME=VALUE, got {item!r}")
        settings[name.strip().lower().removeprefix("ipam_")] = value.strip()
    results = []
    burst: dict[str, Any] = {}
    with MotoServer(local_ec2=args.prefix_delegation) as moto:
        if not args.skip_burst and args.prefix_delegation:
            burst = compare_prefix_delegation(moto, args.burst_nodes, args.allocations, settings)
        elif not args.skip_burst:
            burst = burst_two_replicas(moto, args.burst_nodes, args.allocations, settings)
            print_burst(burst)
        for nodes in [] if args.skip_resync else args.nodes:
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
    path.write_text(json.dumps({"machine": machine(), "results": results, "burst": burst}, indent=2))
    if burst and "modes" not in burst:
        print_burst(burst)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
