"""Redis with replicas: an allocation answered OK survives the loss of the primary, and the allocator
follows the failover, on Sentinel and on Redis Cluster.

Real redis-server processes: a primary, its replica and three Sentinels, or a 3+3 Redis Cluster.
Faults at the process boundary: `kill -9` of the primary, SIGSTOP of the replica (a replica that
lags). Callers use the project's client (keyed calls, its default retries) while it happens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from clients.client import Family, IpamClient, IpamClientError
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from services.allocator.store import keys
from services.core.reasons import ErrorReason
from tests.support.allocator_process import CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api, reason_of
from tests.support.polling import poll
from tests.support.redis_server import RedisCluster, RedisServer, SentinelGroup, pool_libraries

# Enough free addresses that no caller of a test ever meets an empty pool.
POOL_SIZE = 1000
CALLERS = 4
# Each caller's pace: about 100 calls a second in all, so the load lasts through a failover.
PACE_S = 0.04
# The stalled replica's writes, probed one by one without the client's retries.
PROBES = 3


@dataclass
class Load:
    """Keyed AllocateNext calls from a few threads until stopped: what was answered OK, and what not."""

    address: str
    node: str
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (owner, ip)
    failures: list[IpamClientError] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for index in range(CALLERS):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, index: int) -> None:
        with IpamClient(self.address, token=CLIENT_TOKEN, timeout=10) as client:
            call = 0
            while not self._stop.is_set() and call < POOL_SIZE // CALLERS - 10:
                owner = f"pod-{index}-{call}"
                call += 1
                try:
                    ip = client.allocate_next(self.node, owner=owner, family=Family.IPV4).ipv4.ip
                except IpamClientError as error:
                    with self._lock:
                        self.failures.append(error)
                    continue
                with self._lock:
                    self.acknowledged.append((owner, ip))
                self._stop.wait(PACE_S)

    def count(self) -> int:
        with self._lock:
            return len(self.acknowledged)

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        """Until `more` calls past the count now were answered OK."""
        target = self.count() + more
        poll(lambda: self.count() >= target, timeout=timeout, describe=lambda: f"{self.count()} of {target} OK")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def check_nothing_acknowledged_was_lost(api: Api, node: str, load: Load) -> None:
    """Every allocation answered OK is in the pool under its owner, and no address went to two owners."""
    held = api.dump(node)[0]
    lost = [(owner, ip) for owner, ip in load.acknowledged if held.get(ip) != owner]
    owners_by_ip: dict[str, set[str]] = {}
    for owner, ip in load.acknowledged:
        owners_by_ip.setdefault(ip, set()).add(owner)
    twice = {ip: owners for ip, owners in owners_by_ip.items() if len(owners) > 1}
    assert (lost, twice) == ([], {}), f"{len(lost)} acknowledged allocations lost, {len(twice)} held twice"
    # A call that failed says why, with a reason a caller can act on.
    assert {e.reason for e in load.failures} <= {ErrorReason.OUTCOME_UNKNOWN, ErrorReason.STORE_UNAVAILABLE}, [
        str(e) for e in load.failures
    ]


def probe_writes_while_stalled(api: Api, node: str) -> list[tuple[grpc.StatusCode, str, float]]:
    """Keyed AllocateNext without retries (a plain stub): each call's status, reason and duration."""
    answers = []
    for i in range(PROBES):
        request = pb.AllocateNextRequest(node=node, owner=f"probe-{i}", family=pb.FAMILY_IPV4, idempotency_key=f"p{i}")
        started = time.monotonic()
        try:
            api.alloc.AllocateNext(request, timeout=3)
            answers.append((grpc.StatusCode.OK, "", time.monotonic() - started))
        except grpc.RpcError as error:
            answers.append((error.code(), reason_of(error), time.monotonic() - started))
    return answers


def assert_outcome_unknown(answers: list[tuple[grpc.StatusCode, str, float]], deadline_s: float = 3.0) -> None:
    assert [(code, reason) for code, reason, _ in answers] == [
        (grpc.StatusCode.ABORTED, ErrorReason.OUTCOME_UNKNOWN)
    ] * len(answers)
    assert all(took < deadline_s for _, _, took in answers)


def node_with_pool(api: Api) -> str:
    node = api.create_node(pre_allocate=0)
    api.seed(node, v4=POOL_SIZE)
    return node


# --- Sentinel ------------------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[tuple[SentinelGroup, AllocatorProcess, Api]]:
    with SentinelGroup(down_after_ms=500) as group:
        allocator = AllocatorProcess(
            group.primary.url,
            redis_sentinels=group.sentinel_addresses,
            redis_sentinel_master=group.name,
            redis_min_replicas=1,
            redis_replica_wait_seconds=0.3,
        )
        with allocator:
            api = Api(allocator.address)
            yield group, allocator, api
            api.close()


def test_sentinel_kill_of_the_primary_loses_no_acknowledged_allocation(
    sentinel: tuple[SentinelGroup, AllocatorProcess, Api],
) -> None:
    group, allocator, api = sentinel
    node = node_with_pool(api)
    load = Load(allocator.address, node).start()
    try:
        load.wait_for(20)
        group.primary.kill()
        # Before the Sentinels act: UNAVAILABLE when nothing reached Redis (the usual case: the master
        # is gone), OUTCOME_UNKNOWN when it was written to a connection not yet seen closed.
        request = pb.AllocateNextRequest(node=node, owner="during", family=pb.FAMILY_IPV4, idempotency_key="during")
        with pytest.raises(grpc.RpcError) as during:
            api.alloc.AllocateNext(request, timeout=2)
        assert (during.value.code(), reason_of(during.value)) in {
            (grpc.StatusCode.UNAVAILABLE, ErrorReason.STORE_UNAVAILABLE),
            (grpc.StatusCode.ABORTED, ErrorReason.OUTCOME_UNKNOWN),
        }, during.value.details()
        group.wait_promoted(group.replica)
        # Until a replica holds the new master's writes, none is answered OK: the old primary comes
        # back as that replica, as its supervisor would restart it.
        group.rejoin(group.primary)
        load.wait_for(20)  # the allocator followed the new master
    finally:
        load.stop()
    check_nothing_acknowledged_was_lost(api, node, load)
    # And says so (ipamctl status shows it).
    redis = api.admin_alloc.DebugStatus(pb.DebugStatusRequest(), timeout=5).redis
    assert (redis.mode, redis.master, redis.replicas, redis.min_replicas) == (
        "sentinel",
        f"127.0.0.1:{group.replica.port}",
        1,
        1,
    )


def test_sentinel_lagging_replica_promoted_loses_no_acknowledged_allocation(
    sentinel: tuple[SentinelGroup, AllocatorProcess, Api],
) -> None:
    group, allocator, api = sentinel
    node = node_with_pool(api)
    load = Load(allocator.address, node).start()
    try:
        load.wait_for(20)
        group.replica.pause()
        # The primary runs these, but no replica holds them: none may be answered OK.
        assert_outcome_unknown(probe_writes_while_stalled(api, node))
        group.primary.kill()
        group.replica.resume()
        group.wait_promoted(group.replica)
        group.rejoin(group.primary)
        load.wait_for(20)
    finally:
        load.stop()
    check_nothing_acknowledged_was_lost(api, node, load)


# --- Redis Cluster -------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[tuple[RedisCluster, AllocatorProcess, Api]]:
    # A replica whose master died while it was stalled still takes over (the lagging case).
    options = ["--cluster-replica-validity-factor", "0"]
    with RedisCluster(3, replicas=1, node_timeout_ms=1000, extra_args=options) as redis_cluster:
        allocator = AllocatorProcess(
            redis_cluster.url, cluster=True, redis_min_replicas=1, redis_replica_wait_seconds=0.3
        )
        with allocator:
            api = Api(allocator.address)
            yield redis_cluster, allocator, api
            api.close()


def test_cluster_kill_of_the_master_loses_no_acknowledged_allocation(
    cluster: tuple[RedisCluster, AllocatorProcess, Api],
) -> None:
    redis_cluster, allocator, api = cluster
    node = node_with_pool(api)
    master = redis_cluster.master_of(keys.node_key(node))
    replica = redis_cluster.replica_of(master)
    load = Load(allocator.address, node).start()
    try:
        load.wait_for(20)
        master.kill()
        redis_cluster.wait_serves(keys.node_key(node), replica)
        master.start()  # back, as a replica of the node that took over
        redis_cluster.wait_replica_in_sync(replica)
        load.wait_for(20)
    finally:
        load.stop()
    check_nothing_acknowledged_was_lost(api, node, load)


def test_cluster_lagging_replica_promoted_loses_no_acknowledged_allocation(
    cluster: tuple[RedisCluster, AllocatorProcess, Api],
) -> None:
    redis_cluster, allocator, api = cluster
    node = node_with_pool(api)
    master = redis_cluster.master_of(keys.node_key(node))
    replica = redis_cluster.replica_of(master)
    redis_cluster.wait_replica_in_sync(master)
    load = Load(allocator.address, node).start()
    try:
        load.wait_for(20)
        replica.pause()
        assert_outcome_unknown(probe_writes_while_stalled(api, node))
        master.kill()
        replica.resume()
        redis_cluster.wait_serves(keys.node_key(node), replica)
        master.start()
        redis_cluster.wait_replica_in_sync(replica)
        load.wait_for(20)
    finally:
        load.stop()
    check_nothing_acknowledged_was_lost(api, node, load)


# --- the only replica stopped --------------------------------------------------------------------


@pytest.fixture(scope="module")
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    group = SentinelGroup().start_replication()  # its primary and replica, no Sentinels
    yield group.primary, group.replica
    group.close()


def test_the_replica_holds_the_pool_scripts_so_a_promoted_one_runs_them_at_once(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = primary_and_replica
    with AllocatorProcess(primary.url, redis_min_replicas=1, redis_replica_wait_seconds=0.3) as allocator:
        api = Api(allocator.address)
        api.node_with_pool(v4=4, pre_allocate=0)
        api.close()
    on_primary = pool_libraries(primary.client())
    assert on_primary
    # WAIT covered the library's load as it covers the data: the replica has it already.
    assert pool_libraries(replica.client()) == on_primary


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "redis-py"])
def test_every_write_without_its_replica_answers_outcome_unknown_within_its_deadline(
    primary_and_replica: tuple[RedisServer, RedisServer], pipelined: bool
) -> None:
    primary, replica = primary_and_replica
    allocator = AllocatorProcess(
        primary.url, redis_min_replicas=1, redis_replica_wait_seconds=0.3, redis_pipeline_scripts=pipelined
    )
    with allocator:
        api = Api(allocator.address)
        node = api.create_node(pre_allocate=0)
        ips = api.seed(node, v4=8)
        held = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="held", family=pb.FAMILY_IPV4))
        timer = api.alloc.StartExpirationTimer(
            pb.StartExpirationTimerRequest(node=node, ip=held.ipv4.ip, timeout_seconds=600)
        )
        free = [ip for ip in ips if ip != held.ipv4.ip]
        interface = npb.Interface(id="eni-test0", mac="02:42:ac:11:00:02", subnet_cidr="10.20.0.0/16")
        # In an order where each would succeed on a Redis with its replica.
        writes: dict[str, Callable[[float], object]] = {
            "AllocateNext": lambda t: api.alloc.AllocateNext(
                pb.AllocateNextRequest(node=node, owner="a", family=pb.FAMILY_IPV4, idempotency_key="k"), timeout=t
            ),
            "Allocate": lambda t: api.alloc.Allocate(
                pb.AllocateRequest(node=node, owner="b", ip=free[0], idempotency_key="k2"), timeout=t
            ),
            "ExcludeIP": lambda t: api.alloc.ExcludeIP(
                pb.ExcludeIPRequest(node=node, ip=free[1], owner="gateway"), timeout=t
            ),
            "StopExpirationTimer": lambda t: api.alloc.StopExpirationTimer(
                pb.StopExpirationTimerRequest(node=node, ip=held.ipv4.ip, expiration_uuid=timer.expiration_uuid),
                timeout=t,
            ),
            "StartExpirationTimer": lambda t: api.alloc.StartExpirationTimer(
                pb.StartExpirationTimerRequest(node=node, ip=held.ipv4.ip, timeout_seconds=60), timeout=t
            ),
            "AddAddresses": lambda t: api.nodes.AddAddresses(
                npb.AddAddressesRequest(node=node, interface=interface, ips=["10.20.1.1"]), timeout=t
            ),
            "ReserveForRelease": lambda t: api.nodes.ReserveForRelease(
                npb.ReserveForReleaseRequest(node=node, count=1), timeout=t
            ),
            "Release": lambda t: api.alloc.Release(pb.ReleaseRequest(node=node, ip=held.ipv4.ip), timeout=t),
        }
        # Each with a deadline longer than the replica wait; AllocateNext also with a shorter one.
        calls = [(name, 2.0) for name in writes] + [("AllocateNext", 0.2)]
        answers = {}
        replica.pause()
        try:
            for name, deadline in calls:
                try:
                    writes[name](deadline)
                    answers[(name, deadline)] = "OK"
                except grpc.RpcError as error:
                    # Not DEADLINE_EXCEEDED: the allocator answered within the call's deadline.
                    answers[(name, deadline)] = f"{error.code().name} {reason_of(error)}"
        finally:
            replica.resume()
            api.close()
    wrong = {call: answer for call, answer in answers.items() if answer != "ABORTED OUTCOME_UNKNOWN"}
    assert not wrong, wrong


def test_a_primary_refusing_writes_without_its_replicas_is_unavailable_and_nothing_changes(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = primary_and_replica
    with AllocatorProcess(primary.url) as allocator, primary.client() as redis:
        api = Api(allocator.address)
        node = node_with_pool(api)
        redis.config_set("min-replicas-max-lag", 1)
        redis.config_set("min-replicas-to-write", 1)
        replica.pause()
        try:
            poll(lambda: redis.info("replication").get("min_slaves_good_slaves") == 0, timeout=10)
            request = pb.AllocateNextRequest(node=node, owner="refused", family=pb.FAMILY_IPV4, idempotency_key="r")
            with pytest.raises(grpc.RpcError) as caught:
                api.alloc.AllocateNext(request, timeout=3)
        finally:
            replica.resume()
            redis.config_set("min-replicas-to-write", 0)
        assert (caught.value.code(), reason_of(caught.value)) == (
            grpc.StatusCode.UNAVAILABLE,
            ErrorReason.STORE_UNAVAILABLE,
        ), caught.value.details()
        assert "refused" not in api.dump(node)[0].values()
        api.close()


def test_a_keyed_retry_through_another_allocator_is_not_ok_while_no_replica_holds_the_change(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    # Two allocators, as a deployment runs them: a call's retry may reach the other one, whose
    # connections never carried the first try's write, and whose replay writes nothing.
    primary, replica = primary_and_replica
    settings = {"redis_min_replicas": 1, "redis_replica_wait_seconds": 0.3}
    with AllocatorProcess(primary.url, **settings) as first, AllocatorProcess(primary.url, **settings) as second:
        api, other = Api(first.address), Api(second.address)
        node = api.create_node(pre_allocate=0)
        api.seed(node, v4=4)
        warm = pb.AllocateNextRequest(node=node, owner="warm-up", family=pb.FAMILY_IPV4)
        other.alloc.AllocateNext(warm, timeout=5)  # its connections wrote, before the replica stalled
        answers = []
        replica.pause()
        try:
            for stub in (api.alloc, other.alloc):
                request = pb.AllocateNextRequest(node=node, owner="pod", family=pb.FAMILY_IPV4, idempotency_key="k")
                try:
                    stub.AllocateNext(request, timeout=2)
                    answers.append("OK")
                except grpc.RpcError as error:
                    answers.append(f"{error.code().name} {reason_of(error)}")
            for stub in (api.alloc, other.alloc):  # a keyed release retried the same way (CNI's DEL)
                try:
                    stub.ReleaseByKey(pb.ReleaseByKeyRequest(node=node, idempotency_key="k"), timeout=2)
                    answers.append("OK")
                except grpc.RpcError as error:
                    answers.append(f"{error.code().name} {reason_of(error)}")
        finally:
            replica.resume()
        assert answers == ["ABORTED OUTCOME_UNKNOWN"] * 4
        # With the replica back, the release's retry is answered, and the address is free.
        other.alloc.ReleaseByKey(pb.ReleaseByKeyRequest(node=node, idempotency_key="k"), timeout=5)
        assert "pod" not in api.dump(node)[0].values()
        api.close()
        other.close()
