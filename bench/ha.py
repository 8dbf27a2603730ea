#!/usr/bin/env python3
"""Benchmark of high availability: what waiting for a replica costs, and what a failover costs callers.

1. Throughput: AllocateNext under ghz (as bench/run_bench.py's full-speed phase) against a primary with
   one replica (both AOF), the allocator with `IPAM_REDIS_MIN_REPLICAS` 0 (no WAIT) and 1 (a change is
   answered once the replica holds it), alternately for `--rounds` rounds, each on fresh nodes. The
   figure is the ratio of the best round of each: min replicas 1 ÷ 0 (target >= 0.8); the WAITs Redis
   ran per call say how many calls one WAIT covered.
2. Failover: a primary, its replica and three Sentinels (`down-after-milliseconds` 2000), the allocator
   through them with `IPAM_REDIS_MIN_REPLICAS=1`, and callers of the project's client (keyed
   AllocateNext, its default retries and deadline) at a steady pace. The primary is killed (SIGKILL);
   once the replica is promoted, the old primary comes back as its replica (as a supervisor would
   restart it). Figures: the time from the kill to the first OK of a call sent after it, and how many
   calls failed (goal: none); then every OK answer is checked against the pool (none lost, none twice).

    .venv/bin/python -m bench.ha --ghz .bin/ghz [--quick]

Prints a table and writes bench/out/ha-<UTC time>.json; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import ROOT, exit_on_signal, machine, print_log_on_error, write_results
from bench.run_bench import BENCH_PREFIX, Config, call_data, fill, ghz_phase
from clients.client import Family, IpamClient, IpamClientError, node_spec
from ipam.v1 import nodes_pb2
from tests.support.allocator_process import ADMIN_TOKEN, CLIENT_TOKEN, AllocatorProcess
from tests.support.redis_server import RedisServer, SentinelGroup

MIN_THROUGHPUT_RATIO = 0.8  # AllocateNext/s with min replicas 1 over 0
MAX_FAILED_CALLS = 0  # keyed calls of the project's client that failed across the failover
DOWN_AFTER_MS = 2000
CALLERS = 8
PACE_S = 0.02  # each caller's pause between calls: about 400 calls a second in all
BEFORE_KILL_S = 2.0
AFTER_RECOVERY_S = 2.0


@dataclass
class Throughput:
    min_replicas: int
    round: int
    ok_rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    waits_per_call: float = 0.0  # WAIT commands Redis ran per AllocateNext: how well writes share one


@dataclass
class Failover:
    down_after_ms: int
    callers: int
    calls: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # "CODE REASON" -> calls
    promoted_after_s: float = float("nan")  # from the kill until the Sentinels name the replica
    rejoined_after_s: float = float("nan")  # ... until the old primary is the new master's replica
    first_ok_after_s: float = float("nan")  # ... until the first OK of a call sent after the kill
    longest_call_s: float = 0.0
    lost: int = 0  # answered OK, then not in the pool
    twice: int = 0  # addresses answered to two owners


def fill_all(cfg: Config, primary: RedisServer, rounds: int) -> None:
    """The nodes of every round, seeded up front without waiting for the replica (the seeding is not
    what is measured)."""
    with ExitStack() as stack:
        allocator = stack.enter_context(AllocatorProcess(primary.url, log_level="WARNING"))
        stack.push(print_log_on_error(allocator))
        for index in range(rounds):
            for min_replicas in (0, 1):
                prefix = f"{BENCH_PREFIX}{min_replicas}r{index}"
                asyncio.run(fill(allocator.address, prefix, cfg.nodes, cfg.ips_per_node, cfg.ips_per_interface))


def throughput_round(cfg: Config, primary: RedisServer, min_replicas: int, index: int) -> Throughput:
    allocator = AllocatorProcess(
        primary.url,
        workers=cfg.workers,
        log_level="WARNING",
        redis_min_replicas=min_replicas,
    )
    with ExitStack() as stack:
        stack.enter_context(allocator)
        stack.push(print_log_on_error(allocator))
        prefix = f"{BENCH_PREFIX}{min_replicas}r{index}"
        data = [
            {**d, "node": d["node"].replace(BENCH_PREFIX, prefix, 1)}
            for d in call_data(cfg, "AllocateNext", f"o{min_replicas}r{index}", cfg.requests + cfg.skip_first)
        ]
        with primary.client() as redis:
            redis.config_resetstat()
        phase = ghz_phase(
            cfg,
            allocator.address,
            f"AllocateNext, min replicas {min_replicas}",
            "AllocateNext",
            data,
            total=cfg.requests + cfg.skip_first,
            skip_first=cfg.skip_first,
        )
        with primary.client() as redis:
            waits = int(redis.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
    calls = cfg.requests + cfg.skip_first
    return Throughput(
        min_replicas, index, phase.ok_rps, phase.p50_ms, phase.p99_ms, phase.errors, round(waits / calls, 3)
    )


def failover(out: Failover) -> None:
    with SentinelGroup(down_after_ms=out.down_after_ms) as group:
        allocator = AllocatorProcess(
            group.primary.url,
            log_level="WARNING",
            redis_sentinels=group.sentinel_addresses,
            redis_sentinel_master=group.name,
            redis_min_replicas=1,
        )
        with ExitStack() as stack:
            stack.enter_context(allocator)
            stack.push(print_log_on_error(allocator))
            admin = stack.enter_context(IpamClient(allocator.address, token=ADMIN_TOKEN))
            node = "ha-bench"
            admin.create_node(node_spec(node, instance_type="m5.large", pre_allocate=0))
            ips = [f"10.30.{i // 250}.{i % 250 + 2}" for i in range(5000)]
            admin.add_addresses(
                nodes_pb2.AddAddressesRequest(
                    node=node,
                    interface=nodes_pb2.Interface(
                        id="eni-ha", mac="02:00:00:00:00:01", subnet_cidr="10.30.0.0/16", gateway_ip="10.30.0.1"
                    ),
                    ips=ips,
                    vpc_cidrs=["10.30.0.0/16"],
                )
            )
            calls: list[tuple[float, float, str, str, str]] = []  # start, end, owner, ip, error
            lock, stop = threading.Lock(), threading.Event()

            def caller(index: int) -> None:
                with IpamClient(allocator.address, token=CLIENT_TOKEN) as client:
                    n = 0
                    while not stop.is_set():
                        owner, n = f"c{index}-{n}", n + 1
                        started = time.monotonic()
                        try:
                            ip, error = client.allocate_next(node, owner=owner, family=Family.IPV4).ipv4.ip, ""
                        except IpamClientError as exc:
                            ip, error = "", f"{exc.code.name} {exc.reason}"
                        with lock:
                            calls.append((started, time.monotonic(), owner, ip, error))
                        stop.wait(PACE_S)

            threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(out.callers)]
            for thread in threads:
                thread.start()
            time.sleep(BEFORE_KILL_S)  # the steady load before the fault (a duration, not a wait for a state)
            killed = time.monotonic()
            group.primary.kill()
            group.wait_promoted(group.replica, timeout=60)
            out.promoted_after_s = time.monotonic() - killed
            group.rejoin(group.primary)
            out.rejoined_after_s = time.monotonic() - killed
            time.sleep(AFTER_RECOVERY_S)
            stop.set()
            for thread in threads:
                thread.join(30)
            dump = dict(admin.dump(node).ipv4)
        out.calls = len(calls)
        out.ok = sum(1 for c in calls if not c[4])
        for *_, error in calls:
            if error:
                out.failed[error] = out.failed.get(error, 0) + 1
        after = [end - killed for start, end, _, _, error in calls if start >= killed and not error]
        out.first_ok_after_s = min(after) if after else float("nan")
        out.longest_call_s = max(end - start for start, end, *_ in calls)
        owners: dict[str, set[str]] = {}
        for _, _, owner, ip, error in calls:
            if not error:
                owners.setdefault(ip, set()).add(owner)
                out.lost += dump.get(ip) != owner
        out.twice = sum(1 for o in owners.values() if len(o) > 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ghz", type=Path, default=ROOT / ".bin" / "ghz", help="the ghz binary")
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    parser.add_argument("-c", "--concurrency", type=int, default=50, help="ghz concurrent calls")
    parser.add_argument("-n", "--requests", type=int, default=20_000, help="tallied calls per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds of each setting")
    parser.add_argument("--fsync", choices=("everysec", "always"), default="always", help="appendfsync, both servers")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 2000, 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, exit_on_signal)
    cfg = Config(
        ghz=args.ghz,
        workers=args.workers,
        concurrency=args.concurrency,
        connections=0,
        requests=args.requests,
        skip_first=args.requests // 10,
        nodes=16,
        ips_per_interface=50,
        half_seconds=0,
        fsync=args.fsync,
        memory_nodes=0,
        memory_ips=0,
        out_dir=args.out_dir,
    )
    aof = ["--appendonly", "yes", "--appendfsync", args.fsync, "--repl-diskless-sync-delay", "0"]
    rounds: list[Throughput] = []
    with ExitStack() as stack:
        primary = stack.enter_context(RedisServer(extra_args=aof))
        replica = stack.enter_context(RedisServer(extra_args=[*aof, "--replicaof", primary.host, str(primary.port)]))
        print(f"throughput: primary {primary.port}, replica {replica.port}, {cfg.workers} allocator workers")
        fill_all(cfg, primary, args.rounds)
        for index in range(args.rounds):
            for min_replicas in (0, 1):
                print(f"  round {index + 1}, min replicas {min_replicas} ...", flush=True)
                rounds.append(throughput_round(cfg, primary, min_replicas, index))
    best = {n: max(r.ok_rps for r in rounds if r.min_replicas == n) for n in (0, 1)}
    ratio = best[1] / best[0] if best[0] else 0.0
    print(f"failover: down-after-milliseconds {DOWN_AFTER_MS}, {CALLERS} callers ...", flush=True)
    result = Failover(DOWN_AFTER_MS, CALLERS)
    failover(result)
    failed_calls = sum(result.failed.values())
    print()
    print("| min replicas | round | AllocateNext/s | p50 ms | p99 ms | WAIT per call | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rounds:
        figures = f"{r.ok_rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.waits_per_call:.2f} | {r.errors or '-'}"
        print(f"| {r.min_replicas} | {r.round + 1} | {figures} |")
    print(f"\nthroughput, min replicas 1 / 0 (best rounds): {ratio:.2f} (target >= {MIN_THROUGHPUT_RATIO})")
    print(
        f"failover: promoted {result.promoted_after_s:.1f} s after the kill, old primary back as replica at "
        f"{result.rejoined_after_s:.1f} s, first OK of a call sent after the kill at {result.first_ok_after_s:.1f} s; "
        f"{result.calls} calls, {failed_calls} failed {result.failed or ''}, "
        f"longest call {result.longest_call_s:.1f} s; "
        f"acknowledged then lost {result.lost}, held twice {result.twice}"
    )
    document = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "fsync": args.fsync,
        "workers": cfg.workers,
        "concurrency": cfg.concurrency,
        "throughput": [asdict(r) for r in rounds],
        "throughput_ratio": round(ratio, 3),
        "failover": asdict(result),
    }
    path = write_results(args.out_dir, "ha", document)
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    met = ratio >= MIN_THROUGHPUT_RATIO and failed_calls <= MAX_FAILED_CALLS and not (result.lost or result.twice)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
