"""What the benchmarks share: the processes they start, the machine they ran on, Prometheus
scrapes, ghz runs, percentiles and targets. Imported as `bench.harness` (`python -m bench.<name>`)."""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.allocator_process import AllocatorProcess
from tests.support.redis_server import REDIS_SERVER, RedisServer
from tests.support.service_process import ServiceProcess
from tests.support.worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]

# A metric sample: (name, sorted label pairs) -> value.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


# --- targets and percentiles ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A figure a benchmark aims at, and the measured value."""

    name: str
    value: float
    op: str  # "<", "<=" or ">="
    limit: float
    unit: str
    note: str = ""

    @property
    def met(self) -> bool:
        return {"<": operator.lt, "<=": operator.le, ">=": operator.ge}[self.op](self.value, self.limit)

    def line(self) -> str:
        limit = f"{self.op} {self.limit:g} {self.unit}".strip()
        return (
            f"{self.name:<32}{self.value:9.2f} {self.unit:<5} target {limit:<10} "
            f"{'ok' if self.met else 'MISSED':<7}{self.note}"
        )


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, `p` in 0..100 (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(max(0, math.ceil(p / 100 * len(ordered)) - 1), len(ordered) - 1)]


def write_results(out_dir: Path, name: str, document: dict[str, Any]) -> Path:
    """Writes a run's figures to `out_dir/<name>-<UTC time>.json`; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


# --- processes -----------------------------------------------------------------------------------


def start_redis(fsync: str, replica_of: RedisServer | None = None) -> RedisServer:
    """A redis-server in a temporary directory: no RDB snapshots, AOF with the given fsync policy;
    with `replica_of`, a replica of that server, in sync when this returns."""
    args = ["--appendonly", "yes", "--appendfsync", fsync]
    if replica_of is not None:
        args += ["--replicaof", replica_of.host, str(replica_of.port)]
    server = RedisServer(extra_args=args).start()
    if replica_of is not None:
        deadline = time.monotonic() + 20
        with server.client() as client:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the replica of {replica_of.url} is not in sync")
                time.sleep(0.05)
    return server


def start_allocator(redis_url: str, workers: int, **settings: object) -> AllocatorProcess:
    """`python -m services.allocator` with client and admin tokens, no reuse cooldown, quiet logs;
    `settings` as AllocatorProcess takes them (e.g. redis_min_replicas=1)."""
    allocator = AllocatorProcess(redis_url, workers=workers, log_level="WARNING", timer_sweep_seconds=0.5, **settings)
    allocator.start()  # health answers SERVING once one worker is up: wait for the others' metrics too
    deadline = time.monotonic() + 20
    for index in range(workers):
        while True:
            try:
                scrape(metrics_url(allocator, index))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"allocator worker {index} is not up:\n{allocator.log_tail()}") from None
                time.sleep(0.05)
    return allocator


def metrics_url(process: AllocatorProcess | WorkerProcess, index: int = 0) -> str:
    """The metrics of a service process; of an allocator's worker `index`, its base port + index."""
    return f"http://127.0.0.1:{process.metrics_port + index}/metrics"


def print_log_on_error(process: ServiceProcess, name: str = "allocator", lines: int = 30) -> Any:
    """An ExitStack exit callback: the last `lines` of the process's log when the run fails."""

    def on_exit(exc_type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            print(f"{name} log:\n{process.log_tail(lines)}", file=sys.stderr)
        return False

    return on_exit


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (an allocator's `--workers` children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
    return sorted(pids)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes so far (/proc/<pid>/stat), 0 for one that is gone."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / _CLOCK_TICKS


def children_cpu_seconds() -> float:
    """User + system CPU of this process's children that ended and were waited for (ghz runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def exit_on_signal(signum: int, _frame: object) -> None:
    """A SIGTERM handler: unwinds through the caller's ExitStack, so every process is stopped."""
    raise SystemExit(128 + signum)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    redis_version = (
        subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=True)
        .stdout.split()[2]
        .removeprefix("v=")
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis_server": redis_version,
        "kernel": platform.release(),
    }


# --- Prometheus ----------------------------------------------------------------------------------


def scrape(url: str, timeout: float = 2.0) -> str:
    """The Prometheus text at `url`."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def metric_samples(text: str) -> dict[SampleKey, float]:
    """Every sample of a Prometheus text, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: dict[SampleKey, float], after: dict[SampleKey, float]) -> dict[SampleKey, float]:
    """What each sample grew by between two scrapes (counters and histograms)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def counter_total(samples: dict[SampleKey, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def histogram_quantile(samples: dict[SampleKey, float], name: str, q: float) -> float:
    """Prometheus' histogram_quantile over the `<name>_bucket` samples (linear within a bucket)."""
    buckets = sorted(
        (float(dict(labels)["le"]), value) for (sample, labels), value in samples.items() if sample == f"{name}_bucket"
    )
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = upper, count
    return lower


def histogram_bucket(samples: dict[SampleKey, float], name: str, q: float) -> tuple[float, float]:
    """The bucket (lower, upper] holding quantile q: honest where buckets are wide."""
    buckets = sorted(
        (float(dict(labels)["le"]), value) for (sample, labels), value in samples.items() if sample == f"{name}_bucket"
    )
    if not buckets or buckets[-1][1] <= 0:
        return math.nan, math.nan
    lower = 0.0
    for upper, count in buckets:
        if count >= q * buckets[-1][1]:
            return lower, upper
        lower = upper
    return lower, math.inf


def histogram_sum_count(samples: dict[SampleKey, float], name: str) -> tuple[float, int]:
    """The `<name>_sum` and `<name>_count` of a histogram, over every label set."""
    total = sum(v for (s, _), v in samples.items() if s == f"{name}_sum")
    count = sum(v for (s, _), v in samples.items() if s == f"{name}_count")
    return total, int(count)


# --- ghz -----------------------------------------------------------------------------------------


def run_ghz(binary: Path, args: Sequence[str], *, output: Path, timeout: float, what: str) -> dict[str, Any]:
    """One ghz run writing its JSON report to `output`; returns the report, the token removed."""
    output.unlink(missing_ok=True)
    command = [str(binary), *args, "--format", "json", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"ghz {what} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    report: dict[str, Any] = json.loads(output.read_text())
    report.get("options", {}).pop("metadata", None)  # the token
    return report
