"""Load profiles against a running ipam cluster (`make load`), with a report.

    .venv/bin/python -m bench.load --ghz .bin/ghz            # against `make run`

Every ghz run is one `--config` file of bench/ghz/ (`<profile>.<step>.json`). The runner fills in
what only the running cluster knows: the target, the bearer token, and the data rows (ghz reads the
contract through the server's reflection): a data object naming `${node}`
becomes an array with one message per node, which ghz sends round-robin (request n → row n mod
rows), so `${run}-ar-{{.RequestNumber}}` owners land on the same node in AllocateNext and in the
Release that follows; `${ip}` rows come from Dump. Profiles, in the order they run:

  allocate_specific  Allocate of free addresses read from Dump, then Release by address
  allocate_release   AllocateNext IPv4 (wait_for_refill, unique owners) over every node, Release by owner
  mixed_dump         AllocateNext, then Release by owner, each with Dump calls running alongside
  dual_stack         AllocateNext UNSPECIFIED on one node switched to ipv6_enabled for the run, Release
  drain              AllocateNext without wait_for_refill on the smallest node, past its capacity
                     (RESOURCE_EXHAUSTED expected, and allowed only here), then Release of what it got

Before an AllocateNext step the runner waits (bounded) until every node it targets has the headroom
the step needs: released addresses stay in the reuse cooldown (30 s) and still occupy the node's
interface slots. At the end it releases anything the run's owners still hold, waits for the cooldown
and asks for a Resync, so the pools are back at their watermark as found. Pool levels per node are
sampled every second: from the allocators' gauge `ipam_allocator_pool_ips` when they export it
(refreshed every few seconds), else from the admin API (ListNodes).

Writes report.json, latency.png, rps.png, pools.png and the raw ghz reports under --out, prints a
summary table, and exits 1 when a call failed with anything but the drain's RESOURCE_EXHAUSTED, a
profile could not run, or the run left allocations behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import percentile, run_ghz, scrape
from clients.client import IpamClient, IpamClientError
from dev.devcluster import read_env_file
from ipam.v1 import nodes_pb2
from services.core.pool_math import interface_capacity
from services.core.reasons import DeficitReason

ROOT = Path(__file__).resolve().parents[1]
GHZ_CONFIGS = Path(__file__).resolve().parent / "ghz"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_METRICS = "http://127.0.0.1:9100/metrics,http://127.0.0.1:9110/metrics"
DEMO_CLIENT_TOKEN = "change-me-client"
DEMO_ADMIN_TOKEN = "change-me-admin"
POOL_GAUGE = "ipam_allocator_pool_ips"
POOL = "default"
SAMPLE_INTERVAL_S = 1.0
HEADROOM_WAIT_S = 40.0  # a little more than the reuse cooldown
WORKER_RELEASE_DELAY_S = 30.0  # the demo cluster's excess_release_delay_seconds (docker-compose.yml)
SETTLE_WAIT_S = 45.0 + WORKER_RELEASE_DELAY_S  # the reuse cooldown, the release delay, then the release
RESYNC_EVERY_S = 5.0
IPV6_WAIT_S = 30.0
GHZ_TIMEOUT_S = 120.0
ALLOWED_IN_DRAIN = ("RESOURCE_EXHAUSTED",)


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    target: str
    metrics: tuple[str, ...]
    ghz: Path
    token: str
    admin_token: str
    out: Path
    profiles: tuple[str, ...]


def default_tokens() -> tuple[str, str]:
    """Client and admin tokens: the environment first, then .env, then the demo values."""
    env_file = read_env_file(ROOT / ".env")

    def setting(name: str) -> str:
        return os.environ.get(name) or env_file.get(name) or ""

    client = next((t.strip() for t in setting("IPAM_CLIENT_TOKENS").split(",") if t.strip()), DEMO_CLIENT_TOKEN)
    return client, setting("IPAM_ADMIN_TOKEN") or DEMO_ADMIN_TOKEN


def metrics_urls(spec: str) -> tuple[str, ...]:
    """The comma-separated URLs, each `dns:HOST:PORT` expanded to one URL per address of HOST."""
    urls: list[str] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry.startswith("dns:"):
            urls += [entry] if entry else []
            continue
        host, _, port = entry.removeprefix("dns:").rpartition(":")
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)})
        urls += [f"http://{f'[{a}]' if ':' in a else a}:{port}/metrics" for a in addresses]
    return tuple(urls)


def default_ghz() -> Path:
    local = ROOT / ".bin" / "ghz"
    return local if local.exists() else Path(shutil.which("ghz") or "ghz")


def parse_args(argv: Sequence[str] | None) -> Options:
    client_token, admin_token = default_tokens()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the allocator (host:port)")
    parser.add_argument(
        "--metrics",
        default=DEFAULT_METRICS,
        help="allocator metrics URLs, comma-separated; dns:HOST:PORT stands for every address HOST resolves to"
        " (compose's service name: one per replica)",
    )
    parser.add_argument("--ghz", type=Path, default=default_ghz(), help="the ghz binary")
    parser.add_argument("--token", default=client_token, help="client-role bearer token")
    parser.add_argument("--admin-token", default=admin_token, help="admin-role bearer token")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default bench/out/load-<time>/)")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated subset, in run order")
    args = parser.parse_args(argv)
    profiles = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        parser.error(f"unknown profile(s) {', '.join(unknown)}; known: {', '.join(PROFILES)}")
    if shutil.which(str(args.ghz)) is None:
        parser.error(f"ghz not found at {args.ghz}: run `make .bin/ghz` or pass --ghz")
    out = args.out or ROOT / "bench" / "out" / f"load-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    return Options(
        target=args.target,
        metrics=metrics_urls(args.metrics),
        ghz=args.ghz,
        token=args.token,
        admin_token=args.admin_token,
        out=out,
        profiles=tuple(p for p in PROFILES if p in profiles),
    )


# --- the cluster through the admin API --------------------------------------------------------


def capacity(node: nodes_pb2.Node) -> int | None:
    """IPv4 addresses the node's pool can hold (None until the worker reported the instance's limits)."""
    return interface_capacity(node.max_interfaces, node.ipv4_per_interface, node.spec.first_interface_index) or None


# Deficit reasons of a node whose cloud side is broken: no profile can use it until it is fixed.
_BROKEN = frozenset({DeficitReason.INSTANCE_NOT_FOUND, DeficitReason.INSTANCE_TYPE_UNKNOWN, DeficitReason.NO_INSTANCE})


def not_ready(node: nodes_pb2.Node) -> str:
    """Why the profiles cannot use the node ("" when they can): its instance is unknown to the cloud,
    the worker has not reported its limits yet, or its last maintenance failed."""
    if node.stats.deficit_reason in _BROKEN:
        return node.last_error or node.stats.deficit_reason
    if capacity(node) is None:
        return "the worker has not reported its instance limits"
    if node.last_error:
        return f"last cloud error: {node.last_error}"
    return ""


def headroom(node: nodes_pb2.Node) -> int | None:
    """Addresses AllocateNext can still hand out now: cooling ones hold an interface slot."""
    cap = capacity(node)
    return None if cap is None else cap - node.stats.used_ips - node.stats.cooling_ips


def pool_levels(node: nodes_pb2.Node) -> dict[str, int]:
    s = node.stats
    return {
        "used": s.used_ips,
        "available": s.available_ips,
        "cooling": s.cooling_ips,
        "needed": s.needed_ips,
        "used_ipv6": s.used_ipv6,
        "available_ipv6": s.available_ipv6,
    }


_print_lock = threading.Lock()


def say(message: str) -> None:
    """One line on stdout at once (ghz runs report from several threads)."""
    with _print_lock:
        print(message, flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Polls `check` until it holds or `timeout` passes; says once what it waits for."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    said = False
    while not check():
        if time.monotonic() > deadline:
            say(f"    ... not after {timeout:.0f} s; going on")
            return False
        if not said:
            say(f"    waiting for {what} ...")
            said = True
        time.sleep(interval)
    if said:
        say(f"    ... {time.monotonic() - started:.1f} s")
    return True


class Cluster:
    """The admin view of the running cluster: nodes, their pools, their allocations."""

    def __init__(self, client: IpamClient) -> None:
        self.client = client

    def nodes(self) -> dict[str, nodes_pb2.Node]:
        return {n.spec.name: n for n in self.client.list_nodes()}

    def node(self, name: str) -> nodes_pb2.Node:
        return self.client.get_node(name)

    def wait_for_headroom(self, names: Sequence[str], per_node: int, timeout: float = HEADROOM_WAIT_S) -> bool:
        def enough() -> bool:
            rooms = [headroom(self.node(n)) for n in names]
            return all(room is None or room >= per_node for room in rooms)  # None: limits unknown yet

        return wait_for(f"{per_node} addresses of headroom per node (reuse cooldown)", enough, timeout)

    def settle(self, names: Sequence[str], *, cooled: bool = False, timeout: float = SETTLE_WAIT_S) -> bool:
        """Asks for every pool to be recomputed (Resync), then waits until the worker is done with the
        nodes: no deficit it could meet, no excess, no release under way. Dump's free addresses then
        stay free while a profile uses them. With `cooled`, first waits for the reuse cooldown of the
        nodes' released addresses to end (they hold interface slots until then)."""
        if cooled:
            wait_for(
                f"the reuse cooldown on {', '.join(names)} to end",
                lambda: not any(self.node(n).stats.cooling_ips for n in names),
                HEADROOM_WAIT_S,
            )
        resynced = 0.0

        def settled() -> bool:
            nonlocal resynced
            if time.monotonic() - resynced > RESYNC_EVERY_S:  # cooled-down excess publishes no event itself
                self.client.resync()
                resynced = time.monotonic()
            return all(
                (not n.stats.needed_ips or bool(n.stats.deficit_reason))
                and not n.stats.excess_ips
                and not n.reservations
                for n in map(self.node, names)
            )

        return wait_for("the worker to settle the pools (Resync)", settled, timeout)

    def owned(self, name: str, prefix: str) -> dict[str, str]:
        """Addresses of node `name` (both families) whose owner starts with `prefix`: ip -> owner."""
        dump = self.client.dump(name)
        return {ip: owner for ip, owner in [*dump.ipv4.items(), *dump.ipv6.items()] if owner.startswith(prefix)}

    def release_owned(self, names: Sequence[str], prefix: str) -> int:
        """Releases whatever is still allocated to `prefix` owners; returns how many addresses."""
        released = 0
        for name in names:
            for owner in sorted(set(self.owned(name, prefix).values())):
                released += len(self.client.release(name, owner=owner))
        return released


# --- pool levels, sampled -----------------------------------------------------------------------


def _family(label: str) -> str:
    return "ipv6" if "6" in label else "ipv4"


class PoolSampler(threading.Thread):
    """Samples pool levels per node every second: (t, node, family, state, value) rows.

    The allocators' gauge ipam_allocator_pool_ips{node,pool,family,state} is used when a metrics
    endpoint exports it; otherwise ListNodes (admin) gives the same figures.
    """

    def __init__(self, cluster: Cluster, metrics_urls: Sequence[str], interval: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(name="pool-sampler", daemon=True)
        self.cluster = cluster
        self.metrics_urls = list(metrics_urls)
        self.interval = interval
        self.rows: list[tuple[float, str, str, str, float]] = []
        self.sources: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.time()
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a missed sample is not worth ending the run for
                self.sources[f"error: {type(exc).__name__}"] += 1
            self._halt.wait(max(self.interval - (time.time() - started), 0.05))

    def stop(self) -> None:
        """Ends the sampling, with one last sample."""
        self._halt.set()
        self.join(timeout=5)
        self.sample()

    def describe(self) -> str:
        """Where the levels came from, e.g. "metrics (82 samples)"."""
        names = {
            "metrics": "the allocators' ipam_allocator_pool_ips gauge (refreshed every few seconds)",
            "admin": "ListNodes (admin API)",
        }
        return ", ".join(f"{names.get(k, k)}: {n} samples" for k, n in self.sources.items())

    def sample(self) -> None:
        now = time.time()
        levels, source = self._from_metrics(), "metrics"
        if not levels:
            levels, source = self._from_admin(), "admin"
        self.sources[source] += 1
        self.rows.extend((now, node, family, state, value) for (node, family, state), value in levels.items())

    def _from_metrics(self) -> dict[tuple[str, str, str], float]:
        for url in self.metrics_urls:
            try:
                text = scrape(url)
            except OSError:
                continue
            levels = {
                (s.labels["node"], _family(s.labels.get("family", "")), s.labels["state"]): s.value
                for family in text_string_to_metric_families(text)
                if family.name == POOL_GAUGE
                for s in family.samples
                if s.labels.get("pool", POOL) == POOL and "node" in s.labels
            }
            if levels:
                return levels
        return {}

    def _from_admin(self) -> dict[tuple[str, str, str], float]:
        levels: dict[tuple[str, str, str], float] = {}
        for name, node in self.cluster.nodes().items():
            s = node.stats
            for family, state, value in (
                ("ipv4", "available", s.available_ips),
                ("ipv4", "used", s.used_ips),
                ("ipv4", "needed", s.needed_ips),
                ("ipv4", "excess", s.excess_ips),
                ("ipv4", "cooling", s.cooling_ips),
                ("ipv6", "available", s.available_ipv6),
                ("ipv6", "used", s.used_ipv6),
                ("ipv6", "needed", s.needed_ipv6),
            ):
                levels[(name, family, state)] = float(value)
        return levels


def server_calls(urls: Sequence[str]) -> dict[str, dict[tuple[str, str], float]]:
    """ipam_allocator_requests_total per metrics URL: (method, code) -> calls so far."""
    out: dict[str, dict[tuple[str, str], float]] = {}
    for url in urls:
        try:
            text = scrape(url)
        except OSError:
            continue
        out[url] = {
            (s.labels["method"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "ipam_allocator_requests"
            for s in family.samples
            if s.name.endswith("_total")
        }
    return out


def calls_between(
    before: dict[str, dict[tuple[str, str], float]], after: dict[str, dict[tuple[str, str], float]]
) -> dict[str, Any]:
    """What the allocators counted between two scrapes: per method and code, and per replica."""
    by_method: dict[str, dict[str, int]] = defaultdict(dict)
    per_replica: dict[str, int] = {}
    for url, counts in after.items():
        previous = before.get(url, {})
        per_replica[url] = 0
        for (method, code), value in counts.items():
            delta = int(value - previous.get((method, code), 0))
            if delta:
                by_method[method][code] = by_method[method].get(code, 0) + delta
                per_replica[url] += delta
    return {"by_method": dict(by_method), "per_replica": per_replica}


# --- ghz ------------------------------------------------------------------------------------------


def status_name(go_code: str) -> str:
    """ghz's Go status name ("ResourceExhausted") as gRPC spells it ("RESOURCE_EXHAUSTED")."""
    if not go_code:
        return "NO_STATUS"
    return "OK" if go_code == "OK" else re.sub(r"(?<!^)(?=[A-Z])", "_", go_code).upper()


def substitute(template: Any, values: dict[str, str]) -> Any:
    """`${name}` placeholders of a data template, replaced; ghz's own {{...}} actions are kept."""
    if isinstance(template, dict):
        return {key: substitute(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [substitute(value, values) for value in template]
    if isinstance(template, str):

        def value_of(match: re.Match[str]) -> str:
            if match.group(1) not in values:
                raise KeyError(f"data template names ${{{match.group(1)}}}, which this step does not provide")
            return values[match.group(1)]

        return re.sub(r"\$\{(\w+)\}", value_of, template)
    return template


def _ms(value: float) -> float | None:
    """A latency for JSON: None rather than NaN when no call succeeded."""
    return None if math.isnan(value) else round(value, 3)


@dataclass
class Step:
    """One ghz run, as read from its JSON report (times in epoch seconds, latencies in ms)."""

    profile: str
    name: str
    method: str
    config: str
    count: int
    codes: dict[str, int]
    allowed: tuple[str, ...]
    rps: float
    average_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    started: float
    ended: float
    report_file: str
    ghz_summary: dict[str, Any]
    error_messages: dict[str, int] = field(default_factory=dict)
    details: list[tuple[float, float, str]] = field(default_factory=list, repr=False)  # end, latency, status

    @property
    def label(self) -> str:
        return f"{self.profile}/{self.name}"

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def unexpected(self) -> dict[str, int]:
        return {code: n for code, n in self.codes.items() if code != "OK" and code not in self.allowed}

    def figures(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "step": self.name,
            "method": self.method,
            "config": self.config,
            "count": self.count,
            "ok": self.ok,
            "errors": {c: n for c, n in self.codes.items() if c != "OK"},
            "allowed_errors": list(self.allowed),
            "unexpected_errors": self.unexpected,
            "error_messages": self.error_messages,
            "rps": round(self.rps, 2),
            "average_ms": _ms(self.average_ms),
            "p50_ms": _ms(self.p50_ms),
            "p90_ms": _ms(self.p90_ms),
            "p99_ms": _ms(self.p99_ms),
            "started": self.started,
            "ended": self.ended,
            "seconds": round(self.ended - self.started, 3),
            "ghz_report": self.report_file,
            "ghz": self.ghz_summary,
        }


@dataclass(frozen=True)
class StepSpec:
    """One ghz run to make: the config `<profile>.<step>.json`, its data rows, and how to count."""

    profile: str
    step: str
    rows: list[dict[str, str]]
    one_call_per_row: bool = False  # else: total spread evenly over the rows
    allowed: tuple[str, ...] = ()
    total: int | None = None  # overrides the config's total
    alias: str = ""  # the step's name in the report when one config runs twice

    @property
    def name(self) -> str:
        return self.alias or self.step

    @property
    def path(self) -> Path:
        return GHZ_CONFIGS / f"{self.profile}.{self.step}.json"

    def planned_total(self) -> int:
        """Calls ghz will make: one per row, or the total rounded down so every row gets as many."""
        total = self.total if self.total is not None else int(json.loads(self.path.read_text()).get("total", 200))
        if self.one_call_per_row:
            return min(total, len(self.rows))
        return max(len(self.rows), total - total % len(self.rows))

    def per_row(self) -> int:
        return self.planned_total() // max(len(self.rows), 1)


class Ghz:
    """Runs ghz with a config of bench/ghz/, filled in for this cluster and run."""

    def __init__(self, binary: Path, target: str, token: str, run_id: str, out: Path) -> None:
        self.binary = binary
        self.target = target
        self.token = token
        self.run_id = run_id
        self.out = out
        (out / "ghz").mkdir(parents=True, exist_ok=True)

    def config(self, spec: StepSpec) -> dict[str, Any]:
        """The config file with target, contract, token, output and data rows filled in."""
        if not spec.rows:
            raise ValueError(f"{spec.profile}.{spec.step}: no data rows")
        config: dict[str, Any] = json.loads(spec.path.read_text())
        total = spec.planned_total()
        rows = spec.rows[:total] if spec.one_call_per_row else spec.rows
        config.update(
            host=self.target,
            insecure=True,
            total=total,
            metadata={"authorization": f"Bearer {self.token}"},
            format="json",
            output=str(self.out / "ghz" / f"{spec.profile}.{spec.name}.json"),
            data=[substitute(config["data"], {**row, "run": self.run_id}) for row in rows],
        )
        config.setdefault("concurrency", 1)
        config["concurrency"] = min(int(config["concurrency"]), total)
        return config

    def run(self, spec: StepSpec) -> Step:
        config = self.config(spec)
        output = Path(config["output"])
        say(
            f"  ghz {spec.profile}.{spec.name}: {config['total']} x {config['call'].rsplit('.', 1)[-1]}"
            f" over {len(config['data'])} row(s), -c {config['concurrency']}"
            + (f", {config['rps']}/s" if config.get("rps") else "")
        )
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ghz-") as handle:  # holds the token: 0600
            json.dump(config, handle)
            handle.flush()
            started = time.time()
            report = run_ghz(
                self.binary,
                ["--config", handle.name],
                output=output,
                timeout=GHZ_TIMEOUT_S,
                what=f"{spec.profile}.{spec.name}",
            )
            ended = time.time()
        output.write_text(json.dumps(report, indent=1))
        return read_report(spec, report, started, ended, output)

    def run_together(self, specs: Sequence[StepSpec]) -> list[Step]:
        """ghz runs side by side (one process each)."""
        with ThreadPoolExecutor(len(specs)) as pool:
            return list(pool.map(self.run, specs))


def read_report(spec: StepSpec, report: dict[str, Any], started: float, ended: float, path: Path) -> Step:
    """Figures of a ghz JSON report: durations in ns; percentiles over successful calls, as ghz's."""
    details = [
        (datetime.fromisoformat(d["timestamp"]).timestamp(), d["latency"] / 1e6, status_name(d["status"]))
        for d in report.get("details") or []
    ]
    ok_latencies = sorted(latency for _, latency, status in details if status == "OK")
    codes: Counter[str] = Counter()
    for code, n in (report.get("statusCodeDistribution") or {}).items():
        codes[status_name(code)] += n
    summary = {k: v for k, v in report.items() if k != "details"}
    return Step(
        profile=spec.profile,
        name=spec.name,
        method=report["options"]["call"].rsplit(".", 1)[-1],
        config=f"bench/ghz/{spec.profile}.{spec.step}.json",
        count=report["count"],
        codes=dict(codes),
        allowed=spec.allowed,
        rps=report.get("rps", 0.0),
        average_ms=report.get("average", 0) / 1e6,
        p50_ms=percentile(ok_latencies, 50),
        p90_ms=percentile(ok_latencies, 90),
        p99_ms=percentile(ok_latencies, 99),
        started=started,
        ended=ended,
        report_file=str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        ghz_summary=summary,
        error_messages=report.get("errorDistribution") or {},
        details=details,
    )


# --- profiles -------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    name: str
    nodes: list[str]
    started: float = 0.0
    ended: float = 0.0
    steps: list[Step] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    server_calls: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        out = [f"{self.name}: {self.error}"] if self.error else []
        out += [f"{s.label}: {n} x {code}" for s in self.steps for code, n in s.unexpected.items()]
        return out


class NoReadyNode(RuntimeError):
    """Every registered node is one the profiles cannot use."""


class LoadRun:
    """What the profiles share: the cluster, ghz, the run's owner prefix, and which node does what."""

    def __init__(self, cluster: Cluster, ghz: Ghz, run_id: str, metrics: Sequence[str]) -> None:
        self.cluster = cluster
        self.ghz = ghz
        self.run_id = run_id
        self.metrics = list(metrics)
        nodes = cluster.nodes()
        self.skipped = {name: why for name, node in sorted(nodes.items()) if (why := not_ready(node))}
        for name, why in self.skipped.items():
            say(f"skipping {name}: not ready ({why})")
        nodes = {name: node for name, node in nodes.items() if name not in self.skipped}
        if not nodes:
            raise NoReadyNode(f"none of the {len(self.skipped)} node(s) is ready")
        self.nodes = sorted(nodes)
        self.capacities = {name: capacity(node) for name, node in nodes.items()}
        by_size = sorted(self.nodes, key=lambda n: (self.capacities[n] or 0, n))
        self.drain_node = by_size[0]  # the smallest: the quickest to drain
        self.dual_node = by_size[-1] if len(by_size) > 1 else by_size[0]

    def owner_prefix(self, short: str) -> str:
        return f"{self.run_id}-{short}-"

    def node_rows(self, names: Sequence[str] | None = None) -> list[dict[str, str]]:
        return [{"node": name} for name in names or self.nodes]

    def allocate_then_release(
        self,
        result: ProfileResult,
        rows: list[dict[str, str]],
        *,
        alongside: StepSpec | None = None,
        check: Callable[[Step], None] | None = None,
    ) -> None:
        """AllocateNext (`<profile>.allocate`) once the nodes have the headroom it needs, `check` of
        what it did, then Release by the same owners (`<profile>.release`: same rows, same total).
        `alongside` runs next to both."""
        allocate = StepSpec(result.name, "allocate", rows)
        self.cluster.wait_for_headroom(sorted({r["node"] for r in rows}), allocate.per_row())
        result.steps += self._run_with_alongside(allocate, alongside, "during-allocate")
        if check is not None:
            check(result.steps[-1 if alongside is None else -2])
        release = StepSpec(result.name, "release", rows, total=allocate.planned_total())
        result.steps += self._run_with_alongside(release, alongside, "during-release")

    def _run_with_alongside(self, spec: StepSpec, alongside: StepSpec | None, phase: str) -> list[Step]:
        if alongside is None:
            return [self.ghz.run(spec)]
        return self.ghz.run_together([spec, replace(alongside, alias=f"{alongside.step}-{phase}")])

    def run_profile(self, name: str) -> ProfileResult:
        profile, targets = PROFILES[name]
        result = ProfileResult(name, targets(self))
        say(f"{name} on {', '.join(result.nodes)}")
        before = server_calls(self.metrics)
        result.started = time.time()
        try:
            profile(self, result)
        except (IpamClientError, RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            say(f"  {name} failed: {result.error}")
        result.ended = time.time()
        result.server_calls = calls_between(before, server_calls(self.metrics))
        return result


def allocate_specific(run: LoadRun, result: ProfileResult) -> None:
    """Allocate of free addresses read from Dump (node by node, interleaved), then Release by address."""
    run.cluster.settle(result.nodes)
    free = {name: list(run.cluster.client.dump(name).free_ipv4) for name in result.nodes}
    result.notes["free_ipv4_per_node"] = {name: len(ips) for name, ips in free.items()}
    rows = interleaved(free)
    allocate = StepSpec(result.name, "allocate", rows, one_call_per_row=True)
    result.steps.append(run.ghz.run(allocate))
    rows = rows[: allocate.planned_total()]  # the addresses the Allocate step took, in the same order
    result.steps.append(run.ghz.run(StepSpec(result.name, "release", rows, one_call_per_row=True)))


def interleaved(by_node: dict[str, list[str]]) -> list[dict[str, str]]:
    """{node, ip} rows: the first address of every node, then the second, ...: any prefix spreads."""
    depth = max((len(ips) for ips in by_node.values()), default=0)
    return [{"node": name, "ip": ips[i]} for i in range(depth) for name, ips in by_node.items() if i < len(ips)]


def allocate_release(run: LoadRun, result: ProfileResult) -> None:
    """AllocateNext IPv4 with wait_for_refill over every node, then Release by the same owners."""
    run.allocate_then_release(result, run.node_rows(result.nodes))


def mixed_dump(run: LoadRun, result: ProfileResult) -> None:
    """AllocateNext, then Release, each with a Dump run alongside."""
    rows = run.node_rows(result.nodes)
    run.allocate_then_release(result, rows, alongside=StepSpec(result.name, "dump", rows))


def dual_stack(run: LoadRun, result: ProfileResult) -> None:
    """AllocateNext UNSPECIFIED on one node with IPv6 enabled (switched on for the run if it was off)."""
    name = result.nodes[0]
    original = run.cluster.node(name).spec
    result.notes["ipv6_enabled_before"] = original.ipv6_enabled
    if not original.ipv6_enabled:
        spec = nodes_pb2.NodeSpec()
        spec.CopyFrom(original)
        spec.ipv6_enabled = True
        run.cluster.client.update_node(spec)
    try:
        has_ipv6 = wait_for(
            f"the worker to assign IPv6 addresses to {name}",
            lambda: run.cluster.node(name).stats.available_ipv6 > 0,
            IPV6_WAIT_S,
        )
        stats = run.cluster.node(name).stats
        result.notes["ipv6_pool_at_start"] = {"available": stats.available_ipv6, "used": stats.used_ipv6}
        if not has_ipv6:
            raise RuntimeError(f"the worker assigned no IPv6 address to {name} within {IPV6_WAIT_S:.0f} s")

        def both_families(step: Step) -> None:
            held = run.cluster.client.dump(name)
            prefix = run.owner_prefix("ds")
            v4 = {owner for owner in held.ipv4.values() if owner.startswith(prefix)}
            v6 = {owner for owner in held.ipv6.values() if owner.startswith(prefix)}
            result.notes.update(owners_with_ipv4_and_ipv6=len(v4 & v6), owners_with_one_family=len(v4 ^ v6))
            if len(v4 & v6) != step.ok or v4 ^ v6:
                result.error = f"{step.ok} calls succeeded but {len(v4 & v6)} owners hold both families"

        run.allocate_then_release(result, run.node_rows([name]), check=both_families)
    finally:
        if not original.ipv6_enabled:
            # Put back as found: switched off again, the worker gives its IPv6 addresses back.
            run.cluster.client.update_node(original)
            result.notes["ipv6_enabled_restored"] = True


def drain(run: LoadRun, result: ProfileResult) -> None:
    """AllocateNext without wait_for_refill on one node past its capacity, then Release of what it got."""
    name = result.nodes[0]
    cap = run.capacities[name]
    if cap is None:
        raise RuntimeError(f"{name}: the worker has not reported its instance limits")
    run.cluster.settle([name], cooled=True)  # a worker releasing excess would shrink the pool under the drain
    room = headroom(run.cluster.node(name)) or 0
    spec = StepSpec(result.name, "allocate", run.node_rows([name]), allowed=ALLOWED_IN_DRAIN)
    spec = replace(spec, total=max(spec.planned_total(), room + 10))  # past capacity, whatever the node
    step = run.ghz.run(spec)
    result.steps.append(step)
    node = run.cluster.node(name)
    got = run.cluster.owned(name, run.owner_prefix("dr"))
    result.notes.update(
        capacity=cap,
        headroom_before=room,
        allocated=len(got),
        used_after=node.stats.used_ips,
        reached_capacity=node.stats.used_ips >= cap,
        deficit_reason=node.stats.deficit_reason,
    )
    if got:
        rows = [{"node": name, "ip": ip} for ip in sorted(got)]
        result.steps.append(run.ghz.run(StepSpec(result.name, "release", rows, one_call_per_row=True, total=len(rows))))


PROFILES: dict[str, tuple[Callable[[LoadRun, ProfileResult], None], Callable[[LoadRun], list[str]]]] = {
    "allocate_specific": (allocate_specific, lambda run: run.nodes),
    "allocate_release": (allocate_release, lambda run: run.nodes),
    "mixed_dump": (mixed_dump, lambda run: run.nodes),
    "dual_stack": (dual_stack, lambda run: [run.dual_node]),
    "drain": (drain, lambda run: [run.drain_node]),
}


# --- report -------------------------------------------------------------------------------------


def format_codes(codes: dict[str, int], allowed: tuple[str, ...]) -> str:
    errors = [
        f"{code} {n}{' (allowed)' if code in allowed else ''}" for code, n in sorted(codes.items()) if code != "OK"
    ]
    return ", ".join(errors) or "-"


def summary_table(
    results: Sequence[ProfileResult], before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> str:
    header = (
        f"{'profile':<18}{'step':<24}{'calls':>6}{'ok':>6}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}  errors"
    )
    lines = [header]
    for result in results:
        for s in result.steps:
            lines.append(
                f"{result.name:<18}{s.name:<24}{s.count:>6}{s.ok:>6}{s.rps:>9.1f}{s.p50_ms:>9.2f}"
                f"{s.p90_ms:>9.2f}{s.p99_ms:>9.2f}  {format_codes(s.codes, s.allowed)}"
            )
        if result.error:
            lines.append(f"{result.name:<18}FAILED: {result.error}")
        if result.notes:
            lines.append(f"{'':<18}{json.dumps(result.notes, separators=(', ', ': '))}")

    def levels(node: dict[str, int]) -> str:
        keys = ("used", "available", "cooling", "available_ipv6")
        return " / ".join(f"{node[k]:>3}" if k in node else "  ?" for k in keys)

    lines += ["", f"{'node':<20}{'capacity':>9}   IPv4 used / available / cooling / IPv6 available: before -> after"]
    for name in sorted(before):
        lines.append(
            f"{name:<20}{before[name].get('capacity') or '?':>9}   {levels(before[name])}  ->  "
            f"{levels(after.get(name, {}))}"
        )
    return "\n".join(lines)


def levels_now(cluster: Cluster) -> dict[str, dict[str, int]]:
    return {name: {**pool_levels(node), "capacity": capacity(node) or 0} for name, node in cluster.nodes().items()}


@contextmanager
def sampling(cluster: Cluster, metrics: Sequence[str]) -> Iterator[PoolSampler]:
    sampler = PoolSampler(cluster, metrics)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


@dataclass
class Outcome:
    """Everything a run measured, for the report."""

    run: LoadRun
    started: float
    results: list[ProfileResult]
    before: dict[str, dict[str, int]]
    after: dict[str, dict[str, int]]
    leftovers: int
    settled: bool
    sampler: PoolSampler

    @property
    def failures(self) -> list[str]:
        failures = [f for r in self.results for f in r.failures]
        if self.leftovers:
            failures.append(f"{self.leftovers} address(es) still allocated to the run's owners after the profiles")
        return failures


def run_profiles(opts: Options, client: IpamClient) -> Outcome:
    """The profiles, in order, with pool sampling around them; then the cluster put back as found."""
    run_id = f"load-{datetime.now(UTC):%Y%m%d%H%M%S}"
    started = time.time()
    cluster = Cluster(client)
    run = LoadRun(cluster, Ghz(opts.ghz, opts.target, opts.token, run_id, opts.out), run_id, opts.metrics)
    before = levels_now(cluster)
    results: list[ProfileResult] = []
    with sampling(cluster, opts.metrics) as sampler:
        try:
            for name in opts.profiles:
                results.append(run.run_profile(name))
        finally:
            leftovers = cluster.release_owned(run.nodes, run_id + "-")
            if leftovers:
                say(f"released {leftovers} address(es) the profiles left behind")
            settled = cluster.settle(run.nodes, cooled=True)  # as found: pools back at their watermark
    return Outcome(run, started, results, before, levels_now(cluster), leftovers, settled, sampler)


def write_report(opts: Options, outcome: Outcome) -> None:
    """report.json and the three plots."""
    from bench import load_plots  # matplotlib is slow to import: only once there is something to draw

    results, run = outcome.results, outcome.run
    spans = [(r.name, min(s.started for s in r.steps), max(s.ended for s in r.steps)) for r in results if r.steps]
    steps = [s for r in results for s in r.steps]
    load_plots.latency(steps, opts.out / "latency.png")
    load_plots.rps(steps, opts.out / "rps.png")
    load_plots.pools(
        outcome.sampler.rows, spans, outcome.started, opts.out / "pools.png", run.capacities, outcome.sampler.describe()
    )
    document = {
        "run": run.run_id,
        "target": opts.target,
        "ghz": str(opts.ghz),
        "started": outcome.started,
        "seconds": round(time.time() - outcome.started, 1),
        "ok": not outcome.failures,
        "failures": outcome.failures,
        "nodes": {name: {"capacity": run.capacities[name]} for name in run.nodes},
        "roles": {"drain": run.drain_node, "dual_stack": run.dual_node},
        "skipped_not_ready": run.skipped,
        "pools_before": outcome.before,
        "pools_after": outcome.after,
        "settled_after": outcome.settled,
        "leftovers_released": outcome.leftovers,
        "profiles": [
            {
                "name": r.name,
                "nodes": r.nodes,
                "started": r.started,
                "ended": r.ended,
                "seconds": round(r.ended - r.started, 2),
                "error": r.error,
                "notes": r.notes,
                "server_calls": r.server_calls,
                "steps": [s.figures() for s in r.steps],
            }
            for r in results
        ],
        "pool_samples": {
            "sources": dict(outcome.sampler.sources),
            "columns": ["t", "node", "family", "state", "value"],
            "rows": outcome.sampler.rows,
        },
    }
    (opts.out / "report.json").write_text(json.dumps(document, indent=1, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        with IpamClient(opts.target, token=opts.admin_token, timeout=10) as client:
            if not client.list_nodes():
                print(f"no nodes registered at {opts.target}: is the cluster seeded (`make run`)?", file=sys.stderr)
                return 1
            outcome = run_profiles(opts, client)
    except NoReadyNode as exc:
        print(f"the allocator at {opts.target}: {exc}; nothing to load", file=sys.stderr)
        return 1
    except (IpamClientError, grpc.RpcError) as exc:
        print(f"the allocator at {opts.target}: {exc}", file=sys.stderr)
        return 1
    write_report(opts, outcome)
    print()
    print(summary_table(outcome.results, outcome.before, outcome.after))
    shown = opts.out.relative_to(ROOT) if opts.out.is_relative_to(ROOT) else opts.out
    print(f"\npool levels from {outcome.sampler.describe()}")
    print(f"report: {shown}/report.json, latency.png, rps.png, pools.png ({time.time() - outcome.started:.0f} s)")
    if outcome.failures:
        print("\nFAILED:\n  " + "\n  ".join(outcome.failures), file=sys.stderr)
        return 1
    print("ok: no errors but the drain's RESOURCE_EXHAUSTED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
