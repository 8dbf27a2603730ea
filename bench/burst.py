#!/usr/bin/env python3
"""Burst benchmark of the cloud worker: many nodes at their watermark, a burst of allocations at once.

One run starts its own redis-server, moto server (the local EC2), one allocator and one cloud worker
on free 127.0.0.1 ports, creates the demo network in the local EC2, runs `--nodes` instances
(m5.xlarge: 4 interfaces x 15 IPv4 = 56 usable addresses each), registers one node per instance
(pre_allocate 8, the pod subnets by tag) and waits until every pool is at its watermark. Then it
fires `--allocations` AllocateNext calls at once (IPv4, wait_for_refill, a generous deadline),
spread evenly over the nodes, through several channels, and measures:

  1. the wall time until every call succeeded (any failure fails the run);
  2. the EC2 mutating calls the worker made (its Prometheus counters, before and after, until it
     is idle again) versus the minimum that the final EC2 state needed;
  3. the worker's own overhead per maintenance: its duration minus the time in cloud calls (its
     histogram `ipam_worker_maintenance_overhead_seconds`; the give-backs of addresses the local EC2
     handed out twice, its counters `ipam_worker_conflict_give_backs_total` and
     `ipam_worker_conflicting_addresses_total`).

Prints a table with the targets, writes every figure to bench/out/burst-<UTC time>.json, and exits
1 when an allocation (or the set-up) failed. A missed target is reported, not an error.

    .venv/bin/python -m bench.burst [--nodes 20] [--allocations 1000] [--ec2-qps 20 --ec2-burst 40]

`python -m bench.run_bench` (`make bench`) runs it after the allocator phases (`--skip-burst` skips it).
Every process it starts is stopped when it ends, on failure and on SIGINT/SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.client import BaseClient

from bench.harness import (
    ROOT,
    Target,
    child_pids,
    counter_total,
    delta,
    exit_on_signal,
    histogram_bucket,
    histogram_quantile,
    histogram_sum_count,
    machine,
    metric_samples,
    metrics_url,
    percentile,
    print_log_on_error,
    scrape,
    start_allocator,
    start_redis,
    write_results,
)
from clients.client import AsyncIpamClient, Family, IpamClientError, node_spec
from services.core import contract
from tests.support.allocator_process import ADMIN_TOKEN, CLIENT_TOKEN, AllocatorProcess
from tests.support.moto_server import (
    POD_SUBNET_TAGS,
    DemoNetwork,
    MotoServer,
    create_demo_network,
    ec2_client,
    run_instance,
)
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

# What the worker aims at.
MAX_CALL_RATIO = 1.2  # EC2 mutating calls over the minimum the final state needed
MAX_OVERHEAD_P50_MS = 50.0  # the worker's own time per maintenance (total minus cloud calls), p50

MUTATING = (
    "CreateNetworkInterface",
    "AttachNetworkInterface",
    "ModifyNetworkInterfaceAttribute",
    "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses",
    "AssignIpv6Addresses",
    "DeleteNetworkInterface",
)
CALLS_PER_NEW_INTERFACE = 3  # CreateNetworkInterface, AttachNetworkInterface, ModifyNetworkInterfaceAttribute
NODE_PREFIX = "burst"
READY_TIMEOUT_S = 60  # every node at its watermark before the burst
SETTLE_TIMEOUT_S = 30  # the worker idle again after the burst
QUIET_S = 1.0  # counters unchanged this long: the worker is done


@dataclass(frozen=True)
class BurstConfig:
    nodes: int
    allocations: int
    instance_type: str
    pre_allocate: int
    max_above_watermark: int  # Cilium's; 0 in the scenario measured by default
    channels: int  # AsyncIpamClient channels the calls are spread over
    deadline_s: float  # of each AllocateNext
    ec2_qps: float
    ec2_burst: int
    worker_settings: dict[str, str]  # further IPAM_* settings of the worker
    out_dir: Path


@dataclass
class CallStats:
    """The burst's AllocateNext calls."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0  # first call sent -> last call answered
    p50_s: float = 0.0
    p99_s: float = 0.0
    per_node_last_s: dict[str, float] = field(default_factory=dict)


# --- processes ----------------------------------------------------------------------------------


def start_worker(redis_url: str, allocator: AllocatorProcess, moto: MotoServer, cfg: BurstConfig) -> WorkerProcess:
    """`python -m services.cloudworker` with the configured EC2 rate; ready once its metrics answer."""
    settings: dict[str, object] = {
        "ec2_qps": cfg.ec2_qps,
        "ec2_burst": cfg.ec2_burst,
        "gc_interval_seconds": 3600,  # no leaked-interface sweep during the run
        **cfg.worker_settings,
    }
    worker = WorkerProcess(redis_url, allocator.address, moto.endpoint_url, **settings).start()
    deadline = time.monotonic() + 20
    while True:
        try:
            scrape(metrics_url(worker))
            return worker
        except OSError:
            if worker.process is not None and worker.process.poll() is not None:
                code = worker.process.returncode
                raise RuntimeError(f"worker exited with {code}:\n{worker.log_text()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker metrics not up:\n{worker.log_text()[-3000:]}") from None
            time.sleep(0.05)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process this run started (with its children),
    by role, and by this process (the callers)."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    def tree(pid: int) -> float:
        return own(pid) + sum(tree(child) for child in child_pids(pid))

    roles = {"services.allocator": "allocator", "services.cloudworker": "worker", "moto.server": "moto"}
    result = {"callers": own(os.getpid())}
    for child in child_pids(os.getpid()):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = next((name for key, name in roles.items() if key in command), Path(command.split(" ")[0]).name)
        result[role] = result.get(role, 0.0) + tree(child)
    return result


# --- the local EC2 ------------------------------------------------------------------------------


def instance_capacity(ec2: BaseClient, instance_type: str) -> tuple[int, int]:
    """(interfaces, IPv4 per interface) as the local EC2's DescribeInstanceTypes answers them."""
    info = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]["NetworkInfo"]
    return int(info["MaximumNetworkInterfaces"]), int(info["Ipv4AddressesPerInterface"])


def attached_interfaces(ec2: BaseClient, instance_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """instance id -> {interface id: secondary IPv4 addresses, 16 per /28 prefix}, as the local EC2
    holds them."""
    ids = list(instance_ids)
    result: dict[str, dict[str, int]] = {i: {} for i in ids}
    pages = ec2.get_paginator("describe_network_interfaces").paginate(
        Filters=[{"Name": "attachment.instance-id", "Values": ids}]
    )
    for page in pages:
        for raw in page["NetworkInterfaces"]:
            instance = raw.get("Attachment", {}).get("InstanceId", "")
            if instance in result:
                secondaries = sum(1 for a in raw.get("PrivateIpAddresses", []) if not a.get("Primary"))
                result[instance][raw["NetworkInterfaceId"]] = secondaries + 16 * len(raw.get("Ipv4Prefixes", []))
    return result


def minimum_calls(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The fewest mutating calls that turn `before` into `after`: per node, one AssignPrivateIpAddresses
    per pre-existing interface that gained addresses, and create + attach + DeleteOnTermination per
    interface that is new (its secondaries come with CreateNetworkInterface)."""
    assign = created = 0
    for instance, interfaces in after.items():
        old = before.get(instance, {})
        assign += sum(1 for i, n in interfaces.items() if i in old and n > old[i])
        created += sum(1 for i in interfaces if i not in old)
    return {
        "assign_on_existing": assign,
        "interfaces_created": created,
        "total": assign + CALLS_PER_NEW_INTERFACE * created,
        "interfaces_gone": sum(1 for inst, old in before.items() for i in old if i not in after.get(inst, {})),
    }


# --- metrics ------------------------------------------------------------------------------------


def ec2_calls(samples: dict[Any, float]) -> dict[str, dict[str, int]]:
    """operation -> response code -> attempts, from `ipam_worker_cloud_api_duration_seconds_count`."""
    calls: dict[str, dict[str, int]] = {}
    for (name, labels), value in samples.items():
        if name == "ipam_worker_cloud_api_duration_seconds_count":
            tags = dict(labels)
            calls.setdefault(tags["operation"], {})[tags["response_code"]] = int(value)
    return calls


# --- the burst ----------------------------------------------------------------------------------


async def register_nodes(address: str, cfg: BurstConfig, network: DemoNetwork, instances: list[str]) -> list[str]:
    names = [f"{NODE_PREFIX}-{i:02d}" for i in range(len(instances))]
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=10) as admin:
        await asyncio.gather(
            *(
                admin.create_node(
                    node_spec(
                        name,
                        instance_id=instance,
                        instance_type=cfg.instance_type,
                        availability_zone=network.availability_zone,
                        vpc_id=network.vpc_id,
                        subnet_tags=POD_SUBNET_TAGS,
                        pre_allocate=cfg.pre_allocate,
                        max_above_watermark=cfg.max_above_watermark,
                    )
                )
                for name, instance in zip(names, instances, strict=True)
            )
        )
    return names


async def wait_at_watermark(address: str, names: list[str], pre_allocate: int, timeout: float) -> None:
    """Until every node's pool holds at least `pre_allocate` free addresses (exactly that many unless
    max_above_watermark is set), none allocated and none needed."""
    deadline = time.monotonic() + timeout
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=10) as admin:
        while True:
            nodes = await asyncio.gather(*(admin.get_node(n) for n in names))
            short = [
                n.spec.name
                for n in nodes
                if n.stats.used_ips or n.stats.needed_ips or n.stats.available_ips < pre_allocate
            ]
            if not short:
                return
            if time.monotonic() > deadline:
                states = {n.spec.name: (n.stats.available_ips, n.stats.used_ips) for n in nodes if n.spec.name in short}
                raise TimeoutError(f"nodes not at their watermark after {timeout:g} s (available, used): {states}")
            await asyncio.sleep(0.2)


def worker_idle(redis_server: RedisServer) -> bool:
    """Every event of the stream delivered to the worker and acknowledged, and none waiting to be published."""
    with redis_server.client(decode_responses=False) as redis:  # stream entries are protobuf bytes
        if not redis.exists(contract.EVENTS_STREAM):
            return True
        last = redis.xinfo_stream(contract.EVENTS_STREAM)["last-generated-id"]
        group = contract.CONSUMER_GROUP.encode()
        groups = [g for g in redis.xinfo_groups(contract.EVENTS_STREAM) if g["name"] == group]
        markers = next(iter(redis.scan_iter(match="*:evpending", count=1000)), None)
        return bool(groups) and groups[0]["pending"] == 0 and groups[0]["last-delivered-id"] == last and not markers


def wait_idle(redis_server: RedisServer, worker: WorkerProcess, timeout: float) -> dict[Any, float]:
    """Until the worker has no event left and its EC2 counters stay put for QUIET_S; returns its metrics."""
    deadline = time.monotonic() + timeout
    previous: dict[Any, float] | None = None
    while True:
        samples = metric_samples(scrape(metrics_url(worker)))
        calls = ec2_calls(samples)
        if previous is not None and calls == ec2_calls(previous) and worker_idle(redis_server):
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker is not idle {timeout:g} s after the burst")
        previous = samples
        time.sleep(QUIET_S)


async def burst(address: str, names: list[str], cfg: BurstConfig) -> CallStats:
    """`cfg.allocations` AllocateNext at once, call i on node i mod nodes, over `cfg.channels` channels."""
    # A local subchannel pool each: separate TCP connections, not one shared by every channel.
    clients = [
        AsyncIpamClient(address, CLIENT_TOKEN, timeout=cfg.deadline_s, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(cfg.channels)
    ]
    try:
        await asyncio.gather(*(c.ping() for c in clients))  # connected before the clock starts
        started = time.perf_counter()
        ends: list[float] = [math.nan] * cfg.allocations

        async def one(i: int) -> None:
            await clients[i % cfg.channels].allocate_next(
                names[i % len(names)], family=Family.IPV4, owner=f"burst-{i}", wait_for_refill=True
            )
            ends[i] = time.perf_counter() - started

        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(cfg.allocations)), return_exceptions=True),
            cfg.deadline_s + 15,
        )
        stats = CallStats()
        errors: Counter[str] = Counter()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                label = (
                    f"{outcome.code.name} {outcome.reason}"
                    if isinstance(outcome, IpamClientError)
                    else type(outcome).__name__
                )
                errors[label] += 1
                if len(stats.error_samples) < 5:
                    stats.error_samples.append(str(outcome))
        done = [e for e in ends if not math.isnan(e)]
        stats.ok, stats.errors = len(done), dict(errors)
        stats.wall_s = max(done, default=0.0)
        stats.p50_s, stats.p99_s = percentile(done, 50), percentile(done, 99)
        for i, end in enumerate(ends):
            name = names[i % len(names)]
            if not math.isnan(end):
                stats.per_node_last_s[name] = max(stats.per_node_last_s.get(name, 0.0), end)
        return stats
    finally:
        await asyncio.gather(*(c.close() for c in clients))


# --- one run ------------------------------------------------------------------------------------


def run(cfg: BurstConfig) -> dict[str, Any]:
    """Starts everything, runs the burst, stops everything; returns every figure."""
    started = time.perf_counter()
    with ExitStack() as stack:
        print("burst: redis-server, moto server, allocator, worker ...", flush=True)
        redis_server = start_redis("everysec")
        stack.callback(redis_server.close)
        moto = MotoServer().start()
        stack.callback(moto.stop)
        allocator = start_allocator(redis_server.url, 1)
        stack.callback(allocator.kill)
        stack.callback(allocator.stop)
        stack.push(print_log_on_error(allocator))
        worker = start_worker(redis_server.url, allocator, moto, cfg)
        stack.callback(worker.kill)
        stack.callback(worker.stop)
        stack.push(print_log_on_error(worker, "worker", lines=60))

        ec2 = ec2_client(moto.endpoint_url)
        max_interfaces, per_interface = instance_capacity(ec2, cfg.instance_type)
        usable = max_interfaces * (per_interface - 1)  # one primary address per interface
        per_node = math.ceil(cfg.allocations / cfg.nodes)
        if usable < per_node:
            raise ValueError(f"{cfg.instance_type} holds {usable} addresses per node, the burst needs {per_node}")
        print(
            f"burst: demo network, {cfg.nodes} x {cfg.instance_type} ({max_interfaces} interfaces x {per_interface} "
            f"IPv4 = {usable} usable each), nodes at pre_allocate {cfg.pre_allocate} ...",
            flush=True,
        )
        network = create_demo_network(ec2, instance_types=())
        instances = [run_instance(ec2, network, cfg.instance_type) for _ in range(cfg.nodes)]
        seeding = time.perf_counter()
        names = asyncio.run(register_nodes(allocator.address, cfg, network, instances))
        asyncio.run(wait_at_watermark(allocator.address, names, cfg.pre_allocate, READY_TIMEOUT_S))
        before_samples = wait_idle(redis_server, worker, SETTLE_TIMEOUT_S)
        seed_seconds = time.perf_counter() - seeding
        before_ec2 = attached_interfaces(ec2, instances)

        print(
            f"burst: {cfg.allocations} AllocateNext (wait_for_refill) at once over {cfg.channels} channels ...",
            flush=True,
        )
        cpu_before = cpu_seconds()
        burst_started = time.perf_counter()
        calls = asyncio.run(burst(allocator.address, names, cfg))
        after_samples = wait_idle(redis_server, worker, SETTLE_TIMEOUT_S)
        idle_after_s = time.perf_counter() - burst_started
        cpu = {role: round(spent - cpu_before.get(role, 0.0), 2) for role, spent in cpu_seconds().items()}
        after_ec2 = attached_interfaces(ec2, instances)
        final_nodes = asyncio.run(node_states(allocator.address, names))

    return summarize(
        cfg,
        calls=calls,
        samples_before=before_samples,
        samples_after=after_samples,
        ec2_before=before_ec2,
        ec2_after=after_ec2,
        final_nodes=final_nodes,
        capacity={"max_interfaces": max_interfaces, "ipv4_per_interface": per_interface, "usable": usable},
        cpu_seconds=cpu,
        timings={
            "seed_seconds": round(seed_seconds, 2),
            "idle_after_burst_seconds": round(idle_after_s, 2),
            "run_seconds": round(time.perf_counter() - started, 1),
        },
    )


async def node_states(address: str, names: list[str]) -> dict[str, dict[str, Any]]:
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=10) as admin:
        nodes = await asyncio.gather(*(admin.get_node(n) for n in names))
    return {
        n.spec.name: {
            "used": n.stats.used_ips,
            "available": n.stats.available_ips,
            "needed": n.stats.needed_ips,
            "deficit_reason": n.stats.deficit_reason,
        }
        for n in nodes
    }


def summarize(cfg: BurstConfig, **measured: Any) -> dict[str, Any]:
    """Every figure of the run, and the targets."""
    calls: CallStats = measured["calls"]
    samples = delta(measured["samples_before"], measured["samples_after"])
    by_operation = ec2_calls(samples)
    mutating = {op: by_operation.get(op, {}) for op in MUTATING}
    mutating_ok = sum(codes.get("OK", 0) for codes in mutating.values())
    mutating_failed = sum(n for codes in mutating.values() for code, n in codes.items() if code != "OK")
    other = sum(n for op, codes in by_operation.items() if op not in MUTATING for n in codes.values())
    minimum = minimum_calls(measured["ec2_before"], measured["ec2_after"])
    give_back_calls = int(counter_total(samples, "ipam_worker_conflict_give_backs_total"))  # one Unassign each
    counted = mutating_ok + mutating_failed - give_back_calls
    ratio = counted / minimum["total"] if minimum["total"] else math.nan
    raw_ratio = (mutating_ok + mutating_failed) / minimum["total"] if minimum["total"] else math.nan

    wait_sum, wait_count = histogram_sum_count(samples, "ipam_worker_cloud_rate_limit_wait_seconds")
    overhead_hist = "ipam_worker_maintenance_overhead_seconds"
    lag_hist = "ipam_worker_queue_lag_seconds"
    overhead_sum, overhead_count = histogram_sum_count(samples, overhead_hist)
    lag_sum, lag_count = histogram_sum_count(samples, lag_hist)
    _, maintenances = histogram_sum_count(samples, "ipam_worker_maintenance_seconds")
    actions = {
        dict(labels)["type"]: int(v)
        for (name, labels), v in samples.items()
        if name == "ipam_worker_action_duration_seconds_count"
    }
    figures = {
        "calls": asdict(calls),
        "ec2": {
            "mutating": mutating,
            "mutating_ok": mutating_ok,
            "mutating_failed": mutating_failed,
            "conflict_give_backs": {
                "calls": give_back_calls,
                "addresses": int(counter_total(samples, "ipam_worker_conflicting_addresses_total")),
            },
            "mutating_counted": counted,
            "minimum": minimum,
            "ratio": ratio,
            "ratio_with_give_backs": raw_ratio,
            "other_calls": other,
            "all_calls": {op: codes for op, codes in sorted(by_operation.items())},
            "rate_limit_wait_seconds": round(wait_sum, 2),
            "calls_through_bucket": wait_count,
        },
        "worker": {
            "maintenances_with_actions": maintenances,
            "actions": actions,
            "actions_per_maintenance_mean": sum(actions.values()) / maintenances if maintenances else math.nan,
            "total_ms_p50": 1000 * histogram_quantile(samples, "ipam_worker_maintenance_seconds", 0.5),
            "cloud_ms_p50": 1000 * histogram_quantile(samples, "ipam_worker_maintenance_cloud_seconds", 0.5),
            "overhead_ms_p50": 1000 * histogram_quantile(samples, overhead_hist, 0.5),
            "overhead_ms_p99": 1000 * histogram_quantile(samples, overhead_hist, 0.99),
            "overhead_ms_p50_bucket": [1000 * b for b in histogram_bucket(samples, overhead_hist, 0.5)],
            "overhead_ms_mean": 1000 * overhead_sum / overhead_count if overhead_count else math.nan,
            "overhead_count": overhead_count,
            "queue_lag_s_mean": lag_sum / lag_count if lag_count else math.nan,
            "queue_lag_s_p50_bucket": histogram_bucket(samples, lag_hist, 0.5),
            "queue_lag_s_p99_bucket": histogram_bucket(samples, lag_hist, 0.99),
            "events": {
                dict(k[1]).get("outcome", ""): int(v) for k, v in samples.items() if k[0] == "ipam_worker_events_total"
            },
        },
        "final_nodes": measured["final_nodes"],
        "cpu_seconds_burst_to_idle": measured["cpu_seconds"],
        "capacity": measured["capacity"],
        **measured["timings"],
    }
    figures["targets"] = targets(figures)
    return figures


def targets(figures: dict[str, Any]) -> list[Target]:
    ec2, worker = figures["ec2"], figures["worker"]
    return [
        Target(
            "EC2 mutating calls / minimum",
            ec2["ratio"],
            "<=",
            MAX_CALL_RATIO,
            "x",
            f"({ec2['mutating_counted']} / {ec2['minimum']['total']}; with the "
            f"{ec2['conflict_give_backs']['calls']} give-backs {ec2['ratio_with_give_backs']:.2f} x)",
        ),
        Target(
            "worker own overhead p50",
            worker["overhead_ms_p50"],
            "<",
            MAX_OVERHEAD_P50_MS,
            "ms",
            f"(p50 in ({fmt_bucket(worker['overhead_ms_p50_bucket'])}] ms, p99 ~{worker['overhead_ms_p99']:.0f} ms "
            f"over {worker['overhead_count']} maintenances, from the worker's histogram)",
        ),
    ]


# --- report -------------------------------------------------------------------------------------


def table(cfg: BurstConfig, info: dict[str, Any], figures: dict[str, Any]) -> str:
    calls, ec2, worker, cap = figures["calls"], figures["ec2"], figures["worker"], figures["capacity"]
    minimum = ec2["minimum"]
    extra = "".join(f" IPAM_{k.upper()}={v}" for k, v in cfg.worker_settings.items())
    lines = [
        (
            f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, grpcio {info['grpcio']}, "
            f"redis-server {info['redis_server']}; moto, worker, allocator, Redis and the callers share them"
        ),
        (
            f"setup: {cfg.nodes} nodes x {cfg.instance_type} ({cap['max_interfaces']} interfaces x "
            f"{cap['ipv4_per_interface']} IPv4 = {cap['usable']} usable), pre_allocate {cfg.pre_allocate}"
            f"{f' max_above_watermark {cfg.max_above_watermark}' if cfg.max_above_watermark else ''}; "
            f"{cfg.allocations} AllocateNext IPv4 wait_for_refill (deadline {cfg.deadline_s:g} s) over "
            f"{cfg.channels} channels; worker IPAM_EC2_QPS={cfg.ec2_qps:g} IPAM_EC2_BURST={cfg.ec2_burst}{extra} "
            "; the rest as tests/support/worker_process.py sets it"
            f"{'' if 'parallel_nodes' in cfg.worker_settings else ', parallel_nodes 8 (the default)'}"
        ),
        "",
        (
            f"burst: {calls['ok']} of {cfg.allocations} succeeded, the last after {calls['wall_s']:.2f} s "
            f"(call latency p50 {calls['p50_s']:.2f} s, p99 {calls['p99_s']:.2f} s); worker idle again after "
            f"{figures['idle_after_burst_seconds']:.1f} s"
        ),
        "",
        f"{'EC2 mutating calls (worker metrics, burst to idle)':<52}{'OK':>6}{'failed':>8}",
    ]
    for op, codes in ec2["mutating"].items():
        failed = sum(n for code, n in codes.items() if code != "OK")
        lines.append(f"  {op:<50}{codes.get('OK', 0):>6}{failed:>8}")
    lines += [
        f"  {'total':<50}{ec2['mutating_ok']:>6}{ec2['mutating_failed']:>8}",
        (
            f"  of which give-backs: {ec2['conflict_give_backs']['calls']} UnassignPrivateIpAddresses of "
            f"{ec2['conflict_give_backs']['addresses']} address(es) the local EC2 handed out twice (moto picks "
            "addresses at random; AWS does not): left out of the ratio"
        ),
        (
            f"minimum: {minimum['total']} = {minimum['assign_on_existing']} AssignPrivateIpAddresses (one per "
            f"pre-existing interface that gained addresses) + {CALLS_PER_NEW_INTERFACE} x "
            f"{minimum['interfaces_created']} interfaces created (create with its addresses, attach, "
            "DeleteOnTermination), from the final EC2 state of each node"
        ),
        (
            f"other EC2 calls: {ec2['other_calls']} (Describe*); {ec2['calls_through_bucket']} calls waited "
            f"{ec2['rate_limit_wait_seconds']:.1f} s in all for the token bucket"
        ),
        (
            f"worker: {worker['maintenances_with_actions']} maintenances with actions "
            f"({', '.join(f'{n} {k}' for k, n in sorted(worker['actions'].items()))}); per maintenance p50 "
            f"~{worker['total_ms_p50']:.0f} ms of which ~{worker['cloud_ms_p50']:.0f} ms in the cloud; "
            f"{worker['actions_per_maintenance_mean']:.1f} actions per maintenance"
        ),
        (
            f"queue lag (event published -> taken; waits for one of the worker's parallel_nodes slots): mean "
            f"{worker['queue_lag_s_mean']:.1f} s, p50 in ({fmt_bucket(worker['queue_lag_s_p50_bucket'])}] s, "
            f"p99 in ({fmt_bucket(worker['queue_lag_s_p99_bucket'])}] s"
        ),
        (
            "CPU seconds, burst to idle: "
            + ", ".join(f"{role} {spent:.1f}" for role, spent in figures["cpu_seconds_burst_to_idle"].items())
            + f" (of {info['nproc']} CPUs x {figures['idle_after_burst_seconds']:.0f} s)"
        ),
        (
            f"own overhead = maintenance time - time in cloud calls (rate-limiter waits included in the cloud "
            f"time), from the worker's histogram: p50 ~{worker['overhead_ms_p50']:.0f} ms, "
            f"p99 ~{worker['overhead_ms_p99']:.0f} ms, mean {worker['overhead_ms_mean']:.0f} ms"
        ),
        "",
        *(t.line() for t in figures["targets"]),
    ]
    return "\n".join(lines)


def fmt_bucket(bucket: Sequence[float]) -> str:
    return ", ".join(f"{edge:g}" for edge in bucket)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> BurstConfig:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20, help="nodes (one instance each)")
    parser.add_argument("--allocations", type=int, default=1000, help="AllocateNext calls fired at once")
    parser.add_argument("--instance-type", default="m5.xlarge", help="instance type of every node")
    parser.add_argument("--pre-allocate", type=int, default=8, help="the nodes' watermark")
    parser.add_argument(
        "--max-above-watermark", type=int, default=0, help="the nodes' max_above_watermark (0 by default)"
    )
    parser.add_argument("--channels", type=int, default=4, help="client channels the calls are spread over")
    parser.add_argument("--deadline", type=float, default=90.0, help="deadline of each AllocateNext, seconds")
    parser.add_argument("--ec2-qps", type=float, default=20.0, help="the worker's IPAM_EC2_QPS")
    parser.add_argument("--ec2-burst", type=int, default=40, help="the worker's IPAM_EC2_BURST")
    parser.add_argument(
        "--worker-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another worker setting, e.g. parallel_nodes=16 (IPAM_PARALLEL_NODES)",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    settings = {}
    for item in args.worker_setting:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--worker-setting takes NAME=VALUE, got {item!r}")
        settings[name.strip().lower().removeprefix("ipam_")] = value.strip()
    return BurstConfig(
        nodes=args.nodes,
        allocations=args.allocations,
        instance_type=args.instance_type,
        pre_allocate=args.pre_allocate,
        max_above_watermark=args.max_above_watermark,
        channels=args.channels,
        deadline_s=args.deadline,
        ec2_qps=args.ec2_qps,
        ec2_burst=args.ec2_burst,
        worker_settings=settings,
        out_dir=args.out_dir,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_signal)
    info = machine()
    figures = run(cfg)
    document = {
        "time": datetime.now(UTC).isoformat(),
        "machine": info,
        "config": asdict(cfg),
        **{k: v for k, v in figures.items() if k != "targets"},
        "targets": [{**asdict(t), "met": t.met} for t in figures["targets"]],
    }
    path = write_results(cfg.out_dir, "burst", document)
    print(f"\n{table(cfg, info, figures)}\n\nwritten to {os.path.relpath(path)} ({figures['run_seconds']:.0f} s)")
    calls: dict[str, Any] = figures["calls"]
    if calls["ok"] < cfg.allocations or calls["errors"]:
        print(
            f"\nFAILED: {calls['ok']} of {cfg.allocations} allocations succeeded {calls['errors']}\n  "
            + "\n  ".join(calls["error_samples"]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
