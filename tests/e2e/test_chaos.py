"""Chaos: two allocators and two workers (real processes) under a random workload and random faults
— kill -9 of each process, Redis and the local EC2 frozen with SIGSTOP, EC2 faults through a proxy
(throttling, clean 500s, calls carried out and then answered 500, more often for prefix calls) — on
a node with secondary addresses beside nodes in prefix delegation (/28s, one of them dual-stack
with its /80), then the invariants:

- no address has two owners; nothing acknowledged is lost; a call retried with its key, or abandoned
  and then released by its key, holds one address at most;
- no address allocated throughout a sample (Dump, EC2, Dump) is missing from its node in EC2, and
  no allocation is ever marked lost (only out-of-band changes make one);
- at the end the pools equal EC2 (secondaries and prefixes' addresses; the dual-stack node's /80),
  no interface is leaked, the consumer group has nothing pending and the dead letters are empty.

The seed is printed; IPAM_CHAOS_SEED replays a run.
"""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from botocore.client import BaseClient

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.cloudworker.providers.aws import MANAGED_BY_TAG, MANAGED_BY_VALUE
from services.core import contract
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api, reason_of
from tests.support.ec2_fault_proxy import Ec2FaultProxy, FaultRates
from tests.support.moto_server import MotoServer, create_demo_network, ec2_client, run_instance
from tests.support.polling import poll
from tests.support.redis_server import RedisServer, free_port
from tests.support.service_process import ServiceProcess
from tests.support.worker_process import WorkerProcess

CHAOS_SECONDS = float(os.environ.get("IPAM_CHAOS_SECONDS", "50"))
# Per node: its spec's prefix_delegation and ipv6_enabled (a /32 node beside prefix nodes).
NODE_MODES = ((False, False), (True, False), (True, True))
CLIENTS = 4
# Answers after which the call may or may not have happened: the client cannot count on either.
AMBIGUOUS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
RETRIES = 4  # tries of one AllocateNext with the same key while its answers are ambiguous


def ambiguous(error: grpc.RpcError) -> bool:
    """The call may or may not have taken effect (ABORTED OUTCOME_UNKNOWN says so in words)."""
    return error.code() in AMBIGUOUS or reason_of(error) == "OUTCOME_UNKNOWN"


@dataclass
class Ledger:
    """What the workload was told: the acknowledged allocations, and every violation seen."""

    held: dict[str, tuple[str, str]] = field(default_factory=dict)  # ip -> (node, owner)
    unsure: set[str] = field(default_factory=set)  # ips whose last call's answer was ambiguous
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    history: dict[str, list[str]] = field(default_factory=dict)  # ip -> what the workload did and was told
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, ip: str, what: str) -> None:
        with self.lock:
            self.history.setdefault(ip, []).append(f"{time.monotonic():.1f} {what}")

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def acknowledge(self, ip: str, node: str, owner: str) -> None:
        with self.lock:
            if ip in self.held and self.held[ip][1] != owner:
                self.violations.append(
                    f"{ip} handed to {owner} on {node} while {self.held[ip]} holds it ({time.monotonic():.1f})"
                )
            self.held[ip] = (node, owner)
            self.unsure.discard(ip)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _interfaces(ec2: BaseClient, instance_id: str) -> list[dict[str, Any]]:
    filters = [{"Name": "attachment.instance-id", "Values": [instance_id]}]
    return ec2.describe_network_interfaces(Filters=filters)["NetworkInterfaces"]


def pool_addresses(ec2: BaseClient, instance_id: str) -> set[str]:
    """The instance's IPv4 addresses a pool holds: its secondaries and its /28 prefixes' addresses."""
    interfaces = _interfaces(ec2, instance_id)
    singles = {a["PrivateIpAddress"] for i in interfaces for a in i["PrivateIpAddresses"] if not a["Primary"]}
    in_prefixes = {
        str(a) for i in interfaces for p in i.get("Ipv4Prefixes", []) for a in ipaddress.ip_network(p["Ipv4Prefix"])
    }
    return singles | in_prefixes


def ipv6_prefixes(ec2: BaseClient, instance_id: str) -> list[str]:
    return [p["Ipv6Prefix"] for i in _interfaces(ec2, instance_id) for p in i.get("Ipv6Prefixes", [])]


class Cluster:
    """The processes; each can be killed and started again on the same address."""

    def __init__(self, redis: RedisServer, moto: MotoServer, proxy: Ec2FaultProxy) -> None:
        self.redis, self.moto, self.proxy = redis, moto, proxy
        self.ports = [free_port() for _ in range(2)]
        self.allocators = [self._allocator(i) for i in range(2)]
        self.workers = [self._worker(i) for i in range(2)]

    def _allocator(self, i: int) -> AllocatorProcess:
        return AllocatorProcess(self.redis.url, port=self.ports[i], redis_timeout_seconds=1)

    def _worker(self, i: int) -> WorkerProcess:
        return WorkerProcess(
            self.redis.url,
            self.allocators[i].address,
            self.proxy.endpoint_url,
            consumer_name=f"chaos-worker-{i}-{time.monotonic_ns()}",
            resync_interval_seconds=5,
            gc_interval_seconds=2,
            leaked_interface_grace_seconds=2,
            claim_idle_seconds=2,
            node_lock_seconds=5,
            excess_release_delay_seconds=1,  # excess is given back within the run
            stale_reservation_seconds=10,  # a killed worker's reservation is settled within the run
        )

    def start(self) -> None:
        for a in self.allocators:
            a.start()
        for w in self.workers:
            w.start()

    def restart_allocator(self, i: int) -> None:
        self.allocators[i].kill()
        self.allocators[i] = self._allocator(i)
        self.allocators[i].spawn()  # not waited for: it starts while the chaos goes on

    def restart_worker(self, i: int) -> None:
        self.workers[i].kill()
        self.workers[i] = self._worker(i)  # a new consumer name, as a new pod would have
        self.workers[i].spawn()

    def stop(self) -> list[ServiceProcess]:
        processes: list[ServiceProcess] = [*self.workers, *self.allocators]
        for p in processes:
            p.stop()
        return processes


def _freeze(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the fault itself lasts this long
    finally:
        os.kill(pid, signal.SIGCONT)


def _workload(
    apis: list[Api], nodes: list[str], ledger: Ledger, stop: threading.Event, rng: random.Random, me: int
) -> None:
    serial = 0
    mine: list[str] = []  # ips this client holds
    # What gives back a call given up while its outcome was unknown: its key, or (keyless) its owner.
    abandoned: list[pb.ReleaseByKeyRequest | pb.ReleaseRequest] = []
    while not stop.is_set():
        api = rng.choice(apis)
        node = rng.choice(nodes)
        roll = rng.random()
        try:
            if abandoned and roll < 0.3:
                # As a CNI DEL after a failed ADD: whatever the abandoned call took is given back.
                give_back = abandoned[0]
                if isinstance(give_back, pb.ReleaseByKeyRequest):
                    reply = api.alloc.ReleaseByKey(give_back, timeout=3)
                else:
                    try:
                        reply = api.alloc.Release(give_back, timeout=3)
                    except grpc.RpcError as error:
                        if reason_of(error) != "OWNER_NOT_FOUND":  # the call took nothing
                            raise
                        reply = pb.ReleaseResponse()
                abandoned.pop(0)
                for ip in reply.released_ips:
                    ledger.note(ip, f"given back after an abandoned call ({give_back.node})")
                ledger.count("abandoned call given back")
            elif not mine or (roll < 0.5 and len(mine) < 6):
                serial += 1
                owner, key = f"pod-{me}-{serial}", f"key-{me}-{serial}"
                request = pb.AllocateNextRequest(
                    node=node, family=pb.FAMILY_IPV4, owner=owner, idempotency_key=key, wait_for_refill=True
                )
                for attempt in range(1, RETRIES + 1):  # a retry with the same key holds one address at most
                    try:
                        reply = rng.choice(apis).alloc.AllocateNext(request, timeout=3)
                        break
                    except grpc.RpcError as error:
                        if not ambiguous(error):
                            raise
                        if attempt == RETRIES:
                            abandoned.append(pb.ReleaseByKeyRequest(node=node, idempotency_key=key))
                            raise
                        ledger.count(f"retried {error.code().name} {reason_of(error)}".strip())
                        time.sleep(rng.uniform(0.2, 0.5))  # backing off: the fault may last a while
                ledger.acknowledge(reply.ipv4.ip, node, owner)
                ledger.note(reply.ipv4.ip, f"allocated to {owner} ({key}, try {attempt})")
                mine.append(reply.ipv4.ip)
                ledger.count("allocate_next")
            elif roll < 0.85:
                ip = mine.pop(rng.randrange(len(mine)))
                with ledger.lock:  # from the moment it is sent, the release may take effect
                    held_node, owner = ledger.held.pop(ip, (node, "?"))
                # The first try names the address; a retry after an ambiguous answer names the owner
                # (each allocation has an owner of its own here), so it cannot free a later holder's.
                request = pb.ReleaseRequest(node=held_node, ip=ip)
                for attempt in range(1, RETRIES + 1):
                    try:
                        rng.choice(apis).alloc.Release(request, timeout=3)
                        ledger.note(ip, f"released by {owner} (try {attempt})")
                        ledger.count("release")
                        break
                    except grpc.RpcError as error:
                        reason = reason_of(error)
                        ledger.note(ip, f"release by {owner} (try {attempt}): {error.code().name} {reason}")
                        if ambiguous(error) and attempt < RETRIES and owner != "?":
                            ledger.count(f"retried release {error.code().name} {reason}".strip())
                            request = pb.ReleaseRequest(node=held_node, owner=owner)
                            time.sleep(rng.uniform(0.2, 0.5))  # backing off: the fault may last a while
                            continue
                        if ambiguous(error):
                            with ledger.lock:  # released or not: no longer counted on either way
                                ledger.unsure.add(ip)
                        elif attempt > 1 and reason == "OWNER_NOT_FOUND":
                            ledger.count("release")  # an earlier, ambiguous try did it
                            break
                        elif reason in ("IP_NOT_ALLOCATED", "OWNER_NOT_FOUND"):
                            with ledger.lock:
                                ledger.violations.append(f"{ip}, acknowledged to {owner}, was gone when released")
                        else:
                            ledger.acknowledge(ip, held_node, owner)  # refused: still held
                            mine.append(ip)
                        raise
            else:
                free = list(api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=3).free_ipv4)
                if not free:
                    continue
                serial += 1
                owner = f"pod-{me}-{serial}"
                ip = rng.choice(free)
                try:
                    reply = api.alloc.Allocate(pb.AllocateRequest(node=node, ip=ip, owner=owner), timeout=3)
                except grpc.RpcError as error:
                    ledger.note(ip, f"allocate to {owner}: {error.code().name} {reason_of(error)}")
                    if ambiguous(error):
                        abandoned.append(pb.ReleaseRequest(node=node, owner=owner))
                    raise
                ledger.acknowledge(reply.result.ip, node, owner)
                ledger.note(reply.result.ip, f"allocated to {owner} (keyless)")
                mine.append(reply.result.ip)
                ledger.count("allocate")
        except grpc.RpcError as error:
            ledger.count(f"{error.code().name} {reason_of(error)}".strip())
            time.sleep(rng.uniform(0.05, 0.2))  # pacing: a failing client does not spin


def _sample(api: Api, ec2: BaseClient, nodes: dict[str, str], ledger: Ledger) -> None:
    """Dump, EC2, Dump: an address held by the same owner in both dumps was allocated all along, so
    EC2 must hold it on the node; and no allocation is marked lost."""
    for node, instance_id in nodes.items():
        try:
            before = dict(api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=2).ipv4)
            in_ec2 = pool_addresses(ec2, instance_id)
            after = dict(api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=2).ipv4)
            lost = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=2).stats.lost_ips
        except Exception:  # noqa: BLE001 - a frozen Redis or EC2, a killed allocator: no sample
            ledger.count("sample skipped")
            continue
        ledger.count("sample")
        for ip, owner in before.items():
            if after.get(ip) == owner and ip not in in_ec2:
                with ledger.lock:
                    ledger.violations.append(f"{ip} allocated to {owner} on {node} but not on it in EC2")
        if lost:
            with ledger.lock:
                ledger.violations.append(f"{node} has {lost} allocations marked lost")


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("IPAM_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nchaos seed: IPAM_CHAOS_SEED={value}")
    return value


@pytest.fixture
def stack(seed: int) -> Iterator[tuple[RedisServer, MotoServer, Ec2FaultProxy]]:
    with RedisServer() as redis, MotoServer(local_ec2=True) as moto, Ec2FaultProxy(moto.endpoint_url, seed) as proxy:
        yield redis, moto, proxy


@pytest.mark.timeout(240)
def test_chaos_keeps_the_invariants(seed: int, stack: tuple[RedisServer, MotoServer, Ec2FaultProxy]) -> None:
    redis, moto, proxy = stack
    rng = random.Random(seed)
    ec2 = ec2_client(moto.endpoint_url)
    network = create_demo_network(ec2)
    cluster = Cluster(redis, moto, proxy)
    cluster.start()
    apis = [Api(a.address) for a in cluster.allocators]
    nodes: dict[str, str] = {}
    nodes_v6: dict[str, bool] = {}
    for prefix_delegation, ipv6_enabled in NODE_MODES:
        instance_id = run_instance(ec2, network, "m5.large")
        name = apis[0].create_node(
            prefix_delegation=prefix_delegation,
            ipv6_enabled=ipv6_enabled,
            instance_id=instance_id,
            instance_type="m5.large",
            vpc_id=network.vpc_id,
            subnet_ids=[network.subnet_ids[0]],
            security_group_ids=[network.security_group_id],
            pre_allocate=4,
            pre_allocate_set=True,
            max_above_watermark=2,
            release_excess=True,
        )
        nodes[name] = instance_id
        nodes_v6[name] = ipv6_enabled
    for name in nodes:
        poll(lambda n=name: apis[0].stats(n).available_ips >= 4, timeout=30)

    ledger = Ledger()
    stop = threading.Event()
    clients = [
        threading.Thread(target=_workload, args=(apis, list(nodes), ledger, stop, random.Random(seed + i), i))
        for i in range(CLIENTS)
    ]
    for t in clients:
        t.start()

    faults: list[str] = []
    proxy.rates = FaultRates(throttle=0.05, error=0.03, after_call=0.15, prefix_after_call=0.3)
    faults_by_kind: dict[str, Callable[[], None]] = {
        "kill allocator 0": lambda: cluster.restart_allocator(0),
        "kill allocator 1": lambda: cluster.restart_allocator(1),
        "kill worker 0": lambda: cluster.restart_worker(0),
        "kill worker 1": lambda: cluster.restart_worker(1),
        "freeze redis": lambda: _freeze(redis.pid, rng.uniform(1.0, 3.0)),
        "freeze ec2": lambda: _freeze(moto.pid, rng.uniform(1.0, 3.0)),
    }
    end = time.monotonic() + CHAOS_SECONDS
    while time.monotonic() < end:
        kind = rng.choice(sorted(faults_by_kind))
        faults.append(kind)
        faults_by_kind[kind]()
        pause_until = time.monotonic() + rng.uniform(2.0, 4.0)
        while time.monotonic() < pause_until:
            _sample(rng.choice(apis), ec2, nodes, ledger)
            time.sleep(0.2)  # pacing of the samples
    stop.set()
    for t in clients:
        t.join(timeout=30)
    proxy.rates = FaultRates()
    for a in cluster.allocators:
        a.wait_serving()

    unsettled: dict[str, object] = {}

    def settled() -> bool:
        unsettled.clear()
        for node, instance_id in nodes.items():
            dump = apis[0].admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
            pool, cloud = set(dump.ipv4) | set(dump.free_ipv4), pool_addresses(ec2, instance_id)
            if pool != cloud:
                unsettled[node] = {"pool only": pool - cloud, "EC2 only": cloud - pool}
            in_ec2 = ipv6_prefixes(ec2, instance_id)
            if nodes_v6.get(node) and in_ec2 != [dump.ipv6_prefix]:  # one /80, the pool's
                unsettled[f"{node} /80"] = {"pool": dump.ipv6_prefix, "EC2": in_ec2}
        pending = redis.client().xpending(contract.EVENTS_STREAM, contract.CONSUMER_GROUP)["pending"]
        if pending:
            unsettled["pending events"] = pending
        return not unsettled

    try:
        for violation in ledger.violations[:5]:
            ip = violation.split()[0].rstrip(",")
            print(violation, ledger.history.get(ip, [])[-8:])
            for p in [*cluster.workers, *cluster.allocators]:
                print(p.module, [line for line in p.log_text().splitlines() if ip in line][-20:])
        try:
            poll(settled, timeout=60, interval=0.5)
        except AssertionError:
            raise AssertionError(f"not settled: {unsettled}; seed {seed}; faults {faults}") from None
        _sample(apis[0], ec2, nodes, ledger)
        summary = (
            f"seed {seed}; faults {faults}; proxy {proxy.counts} ({proxy.prefix_after_calls} prefix calls carried "
            f"out and answered 500); calls {ledger.counts}"
        )
        print(summary)
        assert ledger.violations == [], summary
        # The prefix nodes' addresses came in /28s.
        in_prefixes = {n: any(i.get("Ipv4Prefixes") for i in _interfaces(ec2, nodes[n])) for n in nodes}
        assert in_prefixes == dict(zip(nodes, [mode[0] for mode in NODE_MODES], strict=True)), (
            f"{in_prefixes}; {summary}"
        )

        # Nothing acknowledged is lost: every address held is still its owner's.
        owners = {}
        for node in nodes:
            owners.update({ip: (node, o) for ip, o in apis[0].dump(node)[0].items()})
        missing = {ip: v for ip, v in ledger.held.items() if owners.get(ip) != v}
        assert missing == {}, summary
        # A retried or abandoned call holds one address at most.
        for node in nodes:
            listed = apis[0].alloc.ListAllocations(pb.ListAllocationsRequest(node=node, key_prefix="key-"), timeout=5)
            by_key: dict[str, list[str]] = {}
            for a in listed.allocations:
                by_key.setdefault(a.idempotency_key, []).append(a.ip)
            assert {k: ips for k, ips in by_key.items() if len(ips) > 1} == {}, summary
        # No address in two pools.
        pools = [
            set(d.ipv4) | set(d.free_ipv4)
            for d in (apis[0].admin_alloc.Dump(pb.DumpRequest(node=n), timeout=5) for n in nodes)
        ]
        assert not set.intersection(*pools), summary

        # No leaked interface: every one of ours is attached (the collector may delete some meanwhile).
        def all_attached() -> bool:
            ours = ec2.describe_network_interfaces(
                Filters=[{"Name": f"tag:{MANAGED_BY_TAG}", "Values": [MANAGED_BY_VALUE]}]
            )["NetworkInterfaces"]
            return all(i.get("Attachment") and i["Status"] == "in-use" for i in ours)

        poll(all_attached, timeout=30)
        client = redis.client()
        assert client.xlen(contract.DEAD_LETTER_STREAM) == 0, summary
        # The consumers of the workers killed are gone once their entries were claimed.
        live = {w.env["IPAM_CONSUMER_NAME"] for w in cluster.workers}
        poll(
            lambda: (
                {_text(c["name"]) for c in client.xinfo_consumers(contract.EVENTS_STREAM, contract.CONSUMER_GROUP)}
                <= live
            ),
            timeout=30,
        )
    finally:
        for api in apis:
            api.close()
        cluster.stop()
