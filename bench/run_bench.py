#!/usr/bin/env python3
"""Benchmark of the ipam allocator: throughput and latency under ghz, Redis memory, allocator RSS.

One run starts its own redis-server (AOF, appendfsync `everysec` or `always`) and `ipam-allocator
--workers N` on free 127.0.0.1 ports, seeds address pools through the real API, then drives the
server with ghz:

  1. Ping                      the ceiling: the same server stack (interceptors) doing nothing
  2. AllocateNext              IPv4, one owner per call ("bench-<n>"), spread over the nodes
  3. Release                   by owner, the same owners: every address of phase 2 goes back
  4. AllocateNext, Release one at a time (ghz -c 1): the scripts' own cost in Redis, uncontended
  5. AllocateNext @ half rate  `--rps` = half the peak of phase 2: the p99 of a busy, unsaturated server

Each phase also splits the cost of a call: CPU of the allocator, Redis and ghz (from /proc over the
phase, divided by its calls), and Redis's commands per call and µs per script call (FCALL; EVALSHA
on older code) from `INFO commandstats` after `CONFIG RESETSTAT`.

then FLUSHALL and 1,000 nodes x 100 addresses through AddAddresses, for Redis bytes per pooled
address, and the resident memory of each allocator worker. Prints a table, writes every figure to
bench/out/bench-<UTC time>.json, and exits 1 when any call failed.

Then the cloud worker's burst scenario (bench/burst.py, its own processes: Redis, the moto server,
an allocator and a worker): 20 nodes at their watermark, 1,000 AllocateNext with wait_for_refill at
once; its table follows and bench/out/burst-<UTC time>.json is written. `--skip-burst` skips it.

    .venv/bin/python -m bench.run_bench --ghz .bin/ghz [--quick] [--workers 2] [--fsync always] [--skip-burst]

Every process it starts is stopped when it ends, on failure and on SIGINT/SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bench import burst
from bench.harness import (
    ROOT,
    Target,
    child_pids,
    children_cpu_seconds,
    cpu_seconds,
    exit_on_signal,
    machine,
    metrics_url,
    print_log_on_error,
    run_ghz,
    scrape,
    start_allocator,
    start_redis,
    write_results,
)
from clients.client import AsyncIpamClient, IpamClient, node_spec
from ipam.v1 import nodes_pb2
from services.allocator.store import keys
from services.allocator.store.redis_store import POOL_LIBRARY
from tests.support.allocator_process import ADMIN_TOKEN, CLIENT_TOKEN, AllocatorProcess
from tests.support.redis_server import RedisServer

# What the allocator aims at.
MIN_RATIO = 0.8  # AllocateNext requests/s over Ping requests/s
MAX_HALF_P99_MS = 5.0  # p99 of AllocateNext at half its peak rate
MAX_BYTES_PER_ADDRESS = 300  # Redis used_memory per pooled address
MAX_WORKER_RSS_MB = 120.0  # VmRSS of each allocator worker process
# What one AllocateNext may cost (the hot path).
MAX_ALLOCATOR_CPU_RATIO = 1.4  # allocator CPU per AllocateNext over per Ping
MAX_SCRIPT_COMMANDS = 12  # Redis commands run inside the allocate_next script
MAX_SCRIPT_US = 20.0  # µs per script call of allocate_next, alone: one call at a time from redis-benchmark
ALONE_CALLS = 3000  # allocate_next calls of that measurement (fewer when the node has fewer free addresses)
MAX_REDIS_CPU_US = 45.0  # Redis CPU per AllocateNext at the peak rate

SERVICE = "ipam.v1.Allocator"
VPC_CIDR = "10.0.0.0/8"
BENCH_PREFIX, MEMORY_PREFIX = "bench", "mem"  # node names: <prefix>-<i>
PHASE_TIMEOUT_S = 90  # a ghz run taking longer is killed (ghz -x would make it ignore -n)
FILL_CONCURRENCY = 32  # seeding calls in flight

_T = TypeVar("_T")


@dataclass(frozen=True)
class Config:
    ghz: Path
    workers: int
    concurrency: int
    connections: int
    requests: int  # tallied calls per full-speed phase
    skip_first: int  # warm-up calls per phase, left out of the tally
    nodes: int  # nodes the ghz phases spread their calls over
    ips_per_interface: int  # addresses per interface (one AddAddresses call each)
    half_seconds: float  # length of the half-rate phase
    half_rate: int  # that phase's calls a second (0: half the measured AllocateNext peak)
    fsync: str  # appendfsync policy of the Redis AOF
    memory_nodes: int
    memory_ips: int  # addresses per node of the memory fill
    out_dir: Path
    skip_burst: bool = False  # the cloud worker's burst scenario (bench/burst.py) runs after the rest
    replica: bool = False  # a replica of Redis, and every change waits for it (IPAM_REDIS_MIN_REPLICAS=1)
    quick: bool = False

    @property
    def ips_per_node(self) -> int:
        """Pool of each bench node: 3 x the calls of a phase in all, so AllocateNext never runs dry."""
        return 3 * (self.requests + self.skip_first) // self.nodes


@dataclass
class Phase:
    """One ghz run, as read from its JSON report (latencies in ms)."""

    name: str
    method: str
    requested: int  # tallied calls asked for
    count: int  # tallied calls made (after --skipFirst), failed ones included
    ok: int
    errors: dict[str, int]  # status code -> calls
    error_messages: dict[str, int]
    rps: float  # ghz's own figure: failed calls count, and so does the warm-up's time
    ok_rps: float  # successful calls per second over `window_s`
    avg_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    window_s: float  # from the first tallied call's start to the last one's end
    rate_limit: int = 0  # --rps, 0 = none
    calls_per_worker: list[int] = field(default_factory=list)
    server_p99_ms: float = float("nan")  # bound from the allocator's own duration histogram (time in the handler)
    calls: int = 0  # every call of the phase, warm-up included: what CPU and commands are divided by
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU per call (µs): allocator, redis, ghz[, replica]
    scripts_per_call: float = 0.0  # script calls (FCALL or EVALSHA) per call
    script_commands: float = 0.0  # Redis commands run inside the scripts, per script call
    script_us: float = float("nan")  # µs per script call by Redis's own clock
    scripts_per_read: float = float("nan")  # script calls per read of Redis's from its clients' sockets
    redis_commands: dict[str, int] = field(default_factory=dict)  # every command Redis ran, by name
    load_average: tuple[float, ...] = ()  # of the machine (1, 5, 15 minutes) at the phase's end

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.ok < self.requested


# --- processes ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def allocator_memory(allocator: AllocatorProcess) -> dict[str, Any]:
    """VmRSS of the `--workers` parent and of each worker process, in MiB."""
    assert allocator.process is not None
    parent = allocator.process.pid
    workers = child_pids(parent) or [parent]  # --workers 1 serves in the process itself
    return {
        "parent_rss_mb": round(rss_mb(parent), 1),
        "worker_rss_mb": [round(rss_mb(pid), 1) for pid in workers],
    }


_SCRIPTS = ("fcall", "evalsha")  # the pool scripts' calls: functions, or scripts in older code
# Commands that are not the scripts' own: the scripts themselves, WAIT after them, the meter's,
# and a replica's acknowledgements.
_OUTSIDE = (*_SCRIPTS, "eval", "fcall_ro", "function", "wait", "info", "config", "replconf", "psync", "sync")


def command_counts(stats: dict[str, Any]) -> dict[str, int]:
    """Calls by command name, from `INFO commandstats`."""
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def commands_inside_scripts(commands: dict[str, int]) -> int:
    """Of `command_counts`, the commands the scripts ran (those of `_OUTSIDE` left out)."""
    return sum(n for name, n in commands.items() if name.split("|")[0] not in _OUTSIDE)


class CostMeter:
    """The cost of one phase's calls: CPU of the allocator's processes, Redis and ghz (the bench's
    children that ended: its ghz runs), and the commands Redis ran (`INFO commandstats`)."""

    def __init__(
        self, redis_server: RedisServer, allocator: AllocatorProcess, replica: RedisServer | None = None
    ) -> None:
        assert allocator.process is not None
        self.redis_server = redis_server
        self.allocator_pids = [allocator.process.pid, *child_pids(allocator.process.pid)]
        self.replica_pids = [replica.pid] if replica is not None else []
        self._start: tuple[float, ...] = ()

    def _cpu(self) -> tuple[float, ...]:
        return (
            cpu_seconds(self.allocator_pids),
            cpu_seconds([self.redis_server.pid]),
            children_cpu_seconds(),
            cpu_seconds(self.replica_pids),
        )

    def start(self) -> None:
        with self.redis_server.client() as redis:
            redis.config_resetstat()
        self._start = self._cpu()

    def stop(self, phase: Phase) -> None:
        """Fills in `phase`'s cost (its `calls` set)."""
        cpu = self._cpu()
        with self.redis_server.client() as redis:
            stats = redis.info("commandstats")
            reads = int(redis.info("stats")["total_reads_processed"])
        calls = max(phase.calls, 1)
        phase.cpu_us = {
            name: round((after - before) * 1e6 / calls, 1)
            for name, before, after in zip(("allocator", "redis", "ghz", "replica"), self._start, cpu, strict=True)
            if name != "replica" or self.replica_pids
        }
        commands = command_counts(stats)
        scripts = sum(commands.get(name, 0) for name in _SCRIPTS)
        inside = commands_inside_scripts(commands)
        phase.redis_commands = commands
        phase.scripts_per_call = scripts / calls
        phase.script_commands = inside / scripts if scripts else 0.0
        script_usec = sum(float(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in _SCRIPTS)
        phase.script_us = script_usec / scripts if scripts else float("nan")
        phase.scripts_per_read = scripts / reads if reads else float("nan")
        phase.load_average = tuple(round(x, 2) for x in os.getloadavg())


def method_samples(allocator: AllocatorProcess, workers: int, method: str) -> list[list[Sample]]:
    """Per worker, the metric samples labelled with `method` (one scrape of each worker)."""
    return [
        [
            s
            for family in text_string_to_metric_families(scrape(metrics_url(allocator, index)))
            for s in family.samples
            if s.labels.get("method") == method
        ]
        for index in range(workers)
    ]


def calls_per_worker(samples: list[list[Sample]]) -> list[int]:
    """How many calls each worker has served so far (Ping is not counted by the server)."""
    return [int(sum(s.value for s in worker if s.name == "ipam_allocator_requests_total")) for worker in samples]


def duration_buckets(samples: list[list[Sample]]) -> dict[float, float]:
    """The server-side duration histogram, all workers summed: upper bound (s) -> calls so far."""
    buckets: dict[float, float] = {}
    for worker in samples:
        for s in worker:
            if s.name == "ipam_allocator_request_duration_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


def server_p99_bound_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest histogram bound that 99 % of the calls between two scrapes finished within (ms);
    NaN when no call was measured (Ping is not instrumented)."""
    delta = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    if total <= 0:
        return float("nan")
    return next(le * 1000 for le, count in delta if count >= 0.99 * total)


# --- seeding through the API --------------------------------------------------------------------


def interfaces(node_index: int, count: int, per_interface: int) -> list[nodes_pb2.Interface]:
    """`count` addresses of node `node_index` (in 10.<i>.0.0/16), on interfaces of `per_interface` each."""
    subnet = ipaddress.ip_network(VPC_CIDR).network_address + node_index * 65536
    result = []
    for number, start in enumerate(range(0, count, per_interface)):
        result.append(
            nodes_pb2.Interface(
                id=f"eni-{node_index:04x}-{number:03x}",
                mac=f"02:00:00:{node_index >> 8 & 0xFF:02x}:{node_index & 0xFF:02x}:{number & 0xFF:02x}",
                device_index=number,
                subnet_id=f"subnet-{node_index}",
                subnet_cidr=f"{subnet}/16",
                gateway_ip=str(subnet + 1),
                addresses=[str(subnet + 10 + i) for i in range(start, min(start + per_interface, count))],
            )
        )
    return result


async def fill(address: str, prefix: str, nodes: int, ips_per_node: int, per_interface: int) -> None:
    """Creates nodes `<prefix>-<i>` and gives each `ips_per_node` addresses (AddAddresses, admin token)."""
    async with AsyncIpamClient(address, ADMIN_TOKEN, timeout=30) as client:
        gate = asyncio.Semaphore(FILL_CONCURRENCY)

        async def bounded(call: Awaitable[_T]) -> _T:
            async with gate:
                return await call

        names = [f"{prefix}-{i}" for i in range(nodes)]
        await asyncio.gather(*(bounded(client.create_node(node_spec(n, instance_type="m5.large"))) for n in names))
        replies = await asyncio.gather(
            *(
                bounded(
                    client.add_addresses(
                        nodes_pb2.AddAddressesRequest(
                            node=name, interface=interface, ips=list(interface.addresses), vpc_cidrs=[VPC_CIDR]
                        )
                    )
                )
                for index, name in enumerate(names)
                for interface in interfaces(index, ips_per_node, per_interface)
            )
        )
    added = sum(len(reply.added_ips) for reply in replies)
    if added != nodes * ips_per_node:
        raise RuntimeError(f"AddAddresses added {added} addresses, expected {nodes * ips_per_node}")


def allocated(address: str, prefix: str, nodes: int) -> int:
    """Addresses allocated on nodes `<prefix>-<i>` (Dump)."""
    with IpamClient(address, ADMIN_TOKEN) as client:
        return sum(len(client.dump(f"{prefix}-{i}").ipv4) for i in range(nodes))


# --- ghz ----------------------------------------------------------------------------------------


def call_data(cfg: Config, method: str, owner_prefix: str, total: int) -> list[dict[str, Any]]:
    """One request per call: call n has owner `<owner_prefix>-<n>` on node `bench-<n mod nodes>`, so a
    Release with the same owners finds every owner of the AllocateNext before it. The requests are
    written out in advance (ghz cycles through a JSON array, parsing each entry once), so that ghz spends
    the same on each call of every method: a template (`{{.RequestNumber}}`) would be parsed and run
    for each AllocateNext call, and not at all for Ping."""
    if method == "Ping":
        return [{}]
    family = {"family": "FAMILY_IPV4"} if method == "AllocateNext" else {}
    return [{"node": f"{BENCH_PREFIX}-{n % cfg.nodes}", "owner": f"{owner_prefix}-{n}", **family} for n in range(total)]


def ghz_phase(
    cfg: Config,
    address: str,
    name: str,
    method: str,
    data: list[dict[str, Any]],
    *,
    total: int,
    skip_first: int,
    rate_limit: int = 0,
) -> Phase:
    """One ghz run against `address` (plaintext, client token); its JSON report parsed."""
    with tempfile.TemporaryDirectory(prefix="ipam-ghz-") as tmp:
        data_path = Path(tmp) / "data.json"
        data_path.write_text(json.dumps(data))
        args = [
            "--insecure",  # no --proto: the server's reflection describes the methods
            "--call",
            f"{SERVICE}.{method}",
            "--data-file",
            str(data_path),
            "--disable-template-functions",  # the requests are written out: nothing for ghz to render
            "--disable-template-data",
            "--metadata",
            json.dumps({"authorization": f"Bearer {CLIENT_TOKEN}"}),
            "--total",
            str(total),
            "--skipFirst",
            str(skip_first),
            "--concurrency",
            str(cfg.concurrency),
            "--connections",
            str(cfg.connections),
            *(["--rps", str(rate_limit)] if rate_limit else []),
            address,
        ]
        report = run_ghz(cfg.ghz, args, output=Path(tmp) / "report.json", timeout=PHASE_TIMEOUT_S, what=method)
    return parse_report(name, method, report, requested=total - skip_first, rate_limit=rate_limit)


def parse_report(name: str, method: str, report: dict[str, Any], *, requested: int, rate_limit: int) -> Phase:
    """Figures of a ghz JSON report (durations in ns; latency percentiles of successful calls only)."""
    codes: dict[str, int] = report.get("statusCodeDistribution") or {}
    ok = codes.get("OK", 0)
    percentiles = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    # ghz's rps divides the tallied calls by the whole run, warm-up included: use the tallied calls' window.
    details = report.get("details") or []
    ends = [_epoch_ns(d["timestamp"]) for d in details]  # a detail's timestamp is the call's end
    window_s = (max(ends) - min(e - d["latency"] for e, d in zip(ends, details, strict=True))) / 1e9 if ends else 0
    return Phase(
        name=name,
        method=method,
        requested=requested,
        count=report["count"],
        ok=ok,
        errors={code: n for code, n in codes.items() if code != "OK"},
        error_messages=report.get("errorDistribution") or {},
        rps=report["rps"],
        ok_rps=ok / window_s if window_s else 0.0,
        avg_ms=report["average"] / 1e6,
        p50_ms=percentiles.get(50, float("nan")),
        p90_ms=percentiles.get(90, float("nan")),
        p99_ms=percentiles.get(99, float("nan")),
        window_s=window_s,
        rate_limit=rate_limit,
    )


def _epoch_ns(timestamp: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time with up to 9 fractional digits."""
    whole, _, fraction = timestamp.removesuffix("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0")[:9])


def load_phases(cfg: Config, allocator: AllocatorProcess, meter: CostMeter) -> tuple[list[Phase], int]:
    """Ping, AllocateNext, Release at full speed; AllocateNext and Release one at a time; then
    AllocateNext at half the measured peak rate. Also returns how many addresses the Release phase
    left allocated (0 when every owner was found)."""

    def phase(name: str, method: str, owners: str, total: int, skip: int, rate: int = 0, serial: bool = False) -> Phase:
        print(f"  {name} ...", flush=True)
        before = method_samples(allocator, cfg.workers, method)
        meter.start()
        run = replace(cfg, concurrency=1, connections=1) if serial else cfg
        result = ghz_phase(
            run,
            allocator.address,
            name,
            method,
            call_data(cfg, method, owners, total),
            total=total,
            skip_first=skip,
            rate_limit=rate,
        )
        result.calls = total
        meter.stop(result)
        after = method_samples(allocator, cfg.workers, method)
        result.calls_per_worker = [
            a - b for a, b in zip(calls_per_worker(after), calls_per_worker(before), strict=True)
        ]
        result.server_p99_ms = server_p99_bound_ms(duration_buckets(before), duration_buckets(after))
        return result

    total, skip = cfg.requests + cfg.skip_first, cfg.skip_first
    phases = [phase(method, method, "bench", total, skip) for method in ("Ping", "AllocateNext", "Release")]
    left = allocated(allocator.address, BENCH_PREFIX, cfg.nodes)
    serial = max(200, cfg.requests // 10)
    phases += [
        phase(f"{method}, one at a time", method, "serial", serial, serial // 10, serial=True)
        for method in ("AllocateNext", "Release")
    ]
    half_rate = cfg.half_rate or max(1, int(phases[1].ok_rps / 2))
    # Bounded by the pool, less a margin so that no node falls below its watermark (no refill events).
    half_total = min(int(half_rate * cfg.half_seconds), int(cfg.ips_per_node * cfg.nodes * 0.9))
    phases.append(
        phase("AllocateNext @ half rate", "AllocateNext", "half", half_total, min(skip, half_total // 10), half_rate)
    )
    return phases, left


def script_alone(redis_server: RedisServer, calls: int = ALONE_CALLS) -> dict[str, Any]:
    """`allocate_next` by itself: redis-benchmark (`-c 1`, a C client, nothing else running) calls the
    function directly, as the allocator does (a new owner and idempotency key each call), on the first
    bench node; µs per call and commands inside it from `INFO commandstats`. Unlike the ghz phase one
    at a time, Redis does not sleep between calls, so its caches stay warm: the script's own cost."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return {"skipped": "redis-benchmark is not installed", "us_per_call": float("nan")}
    node, pool = f"{BENCH_PREFIX}-0", "default"
    pool_keys = keys.pool_keys(node, pool)
    with redis_server.client() as redis:
        calls = min(calls, int(redis.zcard(pool_keys[3])) - 10)  # keys[3]: the IPv4 free set
        if calls < 100:
            return {"skipped": f"{node} has too few free addresses", "us_per_call": float("nan")}
        redis.config_resetstat()
    function = POOL_LIBRARY.functions["allocate_next"]
    argv = [pool, "0", "4", "alone-__rand_int__", "alone-key-__rand_int__", "0", "", ""]
    command = [tool, "-h", redis_server.host, "-p", str(redis_server.port), "-c", "1", "-n", str(calls), "-r"]
    command += ["100000000", "FCALL", function, str(len(pool_keys)), *pool_keys, *argv]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with redis_server.client() as redis:
        stats = redis.info("commandstats")
    fcall = stats.get("cmdstat_fcall", {"calls": 0, "usec": 0})
    inside = commands_inside_scripts(command_counts(stats))
    return {
        "calls": int(fcall["calls"]),
        "us_per_call": float(fcall["usec"]) / max(int(fcall["calls"]), 1),
        "commands_per_call": inside / max(int(fcall["calls"]), 1),
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
    }


# --- memory -------------------------------------------------------------------------------------


def memory_phase(cfg: Config, redis_server: RedisServer, allocator: AllocatorProcess) -> dict[str, Any]:
    """FLUSHALL, then `memory_nodes` x `memory_ips` addresses through the API: Redis bytes per address."""
    with redis_server.client() as redis:
        redis.flushall()
        before = redis.info("memory")
        started = time.perf_counter()
        asyncio.run(fill(allocator.address, MEMORY_PREFIX, cfg.memory_nodes, cfg.memory_ips, cfg.ips_per_interface))
        seconds = time.perf_counter() - started
        after = redis.info("memory")
    addresses = cfg.memory_nodes * cfg.memory_ips
    return {
        "nodes": cfg.memory_nodes,
        "addresses_per_node": cfg.memory_ips,
        "addresses": addresses,
        "fill_seconds": round(seconds, 2),
        "used_memory_delta": after["used_memory"] - before["used_memory"],
        "bytes_per_address": (after["used_memory"] - before["used_memory"]) / addresses,
        "dataset_bytes_per_address": (after["used_memory_dataset"] - before["used_memory_dataset"]) / addresses,
    }


# --- report -------------------------------------------------------------------------------------


def targets(phases: list[Phase], alone: dict[str, Any], memory: dict[str, Any], rss: dict[str, Any]) -> list[Target]:
    ping, alloc, _, serial, _, half = phases
    workers = rss["worker_rss_mb"]
    return [
        Target(
            "AllocateNext / Ping requests/s", alloc.ok_rps / ping.ok_rps if ping.ok_rps else 0.0, ">=", MIN_RATIO, ""
        ),
        Target(
            "allocator CPU AllocateNext / Ping",
            alloc.cpu_us["allocator"] / ping.cpu_us["allocator"] if ping.cpu_us.get("allocator") else 0.0,
            "<=",
            MAX_ALLOCATOR_CPU_RATIO,
            "",
            f"({alloc.cpu_us['allocator']:.0f} / {ping.cpu_us['allocator']:.0f} µs per call)",
        ),
        Target("Redis commands in allocate_next", serial.script_commands, "<=", MAX_SCRIPT_COMMANDS, "", "(+ FCALL)"),
        Target(
            "allocate_next µs, alone",
            alone["us_per_call"],
            "<=",
            MAX_SCRIPT_US,
            "µs",
            f"(redis-benchmark -c 1; through the allocator one at a time: {serial.script_us:.1f} µs)",
        ),
        Target("Redis CPU per AllocateNext", alloc.cpu_us["redis"], "<=", MAX_REDIS_CPU_US, "µs", "(at the peak rate)"),
        Target("p99 at half rate", half.p99_ms, "<", MAX_HALF_P99_MS, "ms", f"({half.rate_limit} AllocateNext/s)"),
        Target(
            "Redis used_memory per address",
            memory["bytes_per_address"],
            "<=",
            MAX_BYTES_PER_ADDRESS,
            "B",
            f"({memory['nodes']} nodes x {memory['addresses_per_node']} addresses via AddAddresses in "
            f"{memory['fill_seconds']} s; dataset alone {memory['dataset_bytes_per_address']:.1f} B)",
        ),
        Target(
            "allocator RSS, largest worker",
            max(workers, default=0.0),
            "<=",
            MAX_WORKER_RSS_MB,
            "MiB",
            (
                f"(workers {' / '.join(f'{m:.1f}' for m in workers)}, parent {rss['parent_rss_mb']:.1f})"
                if len(workers) > 1
                else "(one process)"
            ),
        ),
    ]


def table(cfg: Config, info: dict[str, Any], phases: list[Phase], checks: list[Target]) -> str:
    lines = [
        (
            f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, grpcio {info['grpcio']}, "
            f"redis-server {info['redis_server']}; ghz runs on the same CPUs"
        ),
        (
            f"setup: {cfg.workers} allocator workers, Redis AOF appendfsync {cfg.fsync}, ghz -c {cfg.concurrency} "
            f"--connections {cfg.connections}, {cfg.requests} calls per phase after {cfg.skip_first} warm-up, "
            f"{cfg.nodes} nodes x {cfg.ips_per_node} addresses"
            + (", a replica that every change waits for (WAIT 1)" if cfg.replica else "")
        ),
        "",
        f"{'phase':<34}{'requests/s':>10}{'ok':>8}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'server p99':>12}  calls per worker",
    ]
    for p in phases:
        name = f"{p.name} ({p.rate_limit}/s)" if p.rate_limit else p.name
        split = " / ".join(map(str, p.calls_per_worker)) if any(p.calls_per_worker) else "-"
        server = "-" if p.server_p99_ms != p.server_p99_ms else f"<= {p.server_p99_ms:g}"  # NaN: not measured
        lines.append(
            f"{name:<34}{p.ok_rps:>10.0f}{p.ok:>8}{sum(p.errors.values()):>8}{p.p50_ms:>9.2f}{p.p99_ms:>9.2f}"
            f"{server:>12}  {split}"
        )
    lines += [
        "",
        f"{'cost per call':<34}{'allocator':>10}{'redis':>8}{'ghz':>8}{'scripts':>9}{'cmds in':>9}"
        f"{'µs per':>8}{'scripts':>9}  load average",
        f"{'':<34}{'CPU µs':>10}{'CPU µs':>8}{'CPU µs':>8}{'':>9}{'script':>9}{'script':>8}{'a read':>9}",
    ]
    for p in phases:
        name = f"{p.name} ({p.rate_limit}/s)" if p.rate_limit else p.name
        scripted = p.scripts_per_call >= 0.5  # else the few scripts are the allocator's background reads
        script_us = f"{p.script_us:.1f}" if scripted else "-"
        script_commands = f"{p.script_commands:.1f}" if scripted else "-"
        lines.append(
            f"{name:<34}{p.cpu_us.get('allocator', 0):>10.0f}{p.cpu_us.get('redis', 0):>8.0f}"
            f"{p.cpu_us.get('ghz', 0):>8.0f}{p.scripts_per_call:>9.2f}{script_commands:>9}{script_us:>8}"
            f"{p.scripts_per_read if scripted else float('nan'):>9.2f}  "
            + " ".join(f"{x:.2f}" for x in p.load_average)
            + (f"  (replica {p.cpu_us['replica']:.0f} µs)" if "replica" in p.cpu_us else "")
        )
    return "\n".join([*lines, "", *(check.line() for check in checks)])


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ghz", type=Path, default=ROOT / ".bin" / "ghz", help="the ghz binary")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, len(os.sched_getaffinity(0)) - 1),
        help="allocator processes (--workers; default: one per CPU but one, left to ghz and Redis)",
    )
    parser.add_argument("-c", "--concurrency", type=int, default=50, help="ghz concurrent calls")
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="ghz connections (default 4 per worker: SO_REUSEPORT spreads connections over the workers, not calls)",
    )
    parser.add_argument("-n", "--requests", type=int, default=20_000, help="tallied calls per phase")
    parser.add_argument("--skip-first", type=int, default=None, help="warm-up calls per phase (default n/10)")
    parser.add_argument("--nodes", type=int, default=16, help="nodes the calls are spread over")
    parser.add_argument("--ips-per-interface", type=int, default=50, help="addresses per interface")
    parser.add_argument("--half-seconds", type=float, default=10.0, help="length of the half-rate phase")
    parser.add_argument(
        "--half-rate",
        type=int,
        default=0,
        help="that phase's AllocateNext calls a second instead of half the measured peak (to compare two "
        "builds' p99 at the same load)",
    )
    parser.add_argument("--fsync", choices=("everysec", "always"), default="everysec", help="Redis appendfsync")
    parser.add_argument("--memory-nodes", type=int, default=1000, help="nodes of the memory fill")
    parser.add_argument("--memory-ips", type=int, default=100, help="addresses per node of the memory fill")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (small counts)")
    parser.add_argument("--skip-burst", action="store_true", help="skip the cloud worker's burst (bench/burst.py)")
    parser.add_argument(
        "--replica",
        action="store_true",
        help="a replica of Redis, and every change waits for it (WAIT; IPAM_REDIS_MIN_REPLICAS=1)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.nodes, args.half_seconds, args.memory_nodes = 2000, 4, 2.0, 100
    if not args.ghz.is_file():
        parser.error(
            f"no ghz at {args.ghz}: `make bench` installs it (GOBIN=.bin go install "
            "github.com/bojand/ghz/cmd/ghz@v0.121.0)"
        )
    return Config(
        ghz=args.ghz.resolve(),
        workers=args.workers,
        concurrency=args.concurrency,
        connections=args.connections or 4 * args.workers,
        requests=args.requests,
        skip_first=args.requests // 10 if args.skip_first is None else args.skip_first,
        nodes=args.nodes,
        ips_per_interface=args.ips_per_interface,
        half_seconds=args.half_seconds,
        half_rate=args.half_rate,
        fsync=args.fsync,
        memory_nodes=args.memory_nodes,
        memory_ips=args.memory_ips,
        out_dir=args.out_dir,
        skip_burst=args.skip_burst,
        replica=args.replica,
        quick=args.quick,
    )


def run_burst(cfg: Config) -> int:
    """bench/burst.py with its defaults (`--quick`: 4 nodes, 200 allocations); its exit code."""
    print("\ncloud worker burst (bench/burst.py):", flush=True)
    args = ["--out-dir", str(cfg.out_dir), *(["--nodes", "4", "--allocations", "200"] if cfg.quick else [])]
    try:
        return burst.main(args)
    except Exception as exc:  # noqa: BLE001 - reported as a failure of the run, after the other figures
        print(f"burst failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_signal)
    started = time.perf_counter()
    info = machine()
    with ExitStack() as stack:
        print(f"redis-server (appendfsync {cfg.fsync}), allocator (--workers {cfg.workers}) ...", flush=True)
        redis_server = start_redis(cfg.fsync)
        stack.callback(redis_server.close)
        settings: dict[str, object] = {}
        replica = None
        if cfg.replica:
            print("a replica of it; every change waits for it (IPAM_REDIS_MIN_REPLICAS=1) ...", flush=True)
            replica = start_redis(cfg.fsync, replica_of=redis_server)
            stack.callback(replica.close)
            settings["redis_min_replicas"] = 1
        allocator = start_allocator(redis_server.url, cfg.workers, **settings)
        stack.callback(allocator.kill)
        stack.callback(allocator.stop)
        stack.push(print_log_on_error(allocator))

        print(f"seeding {cfg.nodes} nodes x {cfg.ips_per_node} addresses ...", flush=True)
        seeding = time.perf_counter()
        asyncio.run(fill(allocator.address, BENCH_PREFIX, cfg.nodes, cfg.ips_per_node, cfg.ips_per_interface))
        seed_seconds = time.perf_counter() - seeding

        print("ghz:", flush=True)
        phases, left_allocated = load_phases(cfg, allocator, CostMeter(redis_server, allocator, replica))
        print("allocate_next alone (redis-benchmark -c 1) ...", flush=True)
        alone = script_alone(redis_server)
        rss_after_load = allocator_memory(allocator)
        print(f"memory: FLUSHALL, {cfg.memory_nodes} nodes x {cfg.memory_ips} addresses ...", flush=True)
        memory = memory_phase(cfg, redis_server, allocator)
        rss = allocator_memory(allocator)

    checks = targets(phases, alone, memory, rss)
    path = write_results(
        cfg.out_dir,
        "bench",
        {
            "time": datetime.now(UTC).isoformat(),
            "machine": info,
            "config": {**asdict(cfg), "ips_per_node": cfg.ips_per_node, "seed_seconds": round(seed_seconds, 2)},
            "phases": [asdict(p) for p in phases],
            "left_allocated_after_release": left_allocated,
            "allocate_next_alone": alone,
            "redis_memory": memory,
            "allocator_rss_after_load": rss_after_load,
            "allocator_rss": rss,
            "targets": [{**asdict(c), "met": c.met} for c in checks],
            "run_seconds": round(time.perf_counter() - started, 1),
        },
    )
    print(
        f"\n{table(cfg, info, phases, checks)}\n\nwritten to {os.path.relpath(path)} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    failures = [
        f"{p.name}: {p.ok} of {p.requested} calls succeeded {p.errors} {p.error_messages}" for p in phases if p.failed
    ]
    if left_allocated:
        failures.append(f"Release left {left_allocated} addresses allocated")
    if not cfg.skip_burst and run_burst(cfg) != 0:
        failures.append("the burst scenario failed (see above)")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
