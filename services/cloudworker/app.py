"""Wiring of the worker: events in, pool maintenance out, plus the periodic resync and the
leaked-interface collector. Runs until SIGTERM/SIGINT; a node being maintained is finished."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from redis.asyncio.lock import Lock

from clients.client import AsyncIpamClient
from services.core import contract, liveness, redis_client
from services.core.metrics import WORKER_EXPORTER_KEY, ExporterLease
from services.core.net import split_host_port
from services.core.reasons import DeficitReason, ErrorReason
from services.core.redis_client import RedisClient
from services.core.tasks import cancel_until_done

from . import fencing
from .allocator_client import CLOUD_POOL, AllocatorClient, AllocatorError, PoolNode
from .allocator_grpc import GrpcAllocator
from .cloud_view import CloudView
from .maintainer import NodeMaintainer
from .metrics import WorkerMetrics
from .providers.base import CloudProvider
from .providers.registry import ProviderWiring, build_provider
from .queue import Delivery, EventSource, RedisStreamSource
from .ratelimit import Priority, at_priority, connect_sync
from .settings import WorkerSettings

log = logging.getLogger("ipam.cloudworker")

EXPORTER_LEASE_SECONDS = 15.0  # renewed every third of it


class Worker:
    """Consumes pool events and runs the periodic jobs, one node at a time across all workers."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: RedisClient,
        source: EventSource,
        maintainer: NodeMaintainer,
        provider: CloudProvider,
        allocator: AllocatorClient,
        metrics: WorkerMetrics,
        *,
        close_provider: Callable[[], None] = lambda: None,
        cloud: str = "",
    ) -> None:
        """`close_provider` closes what the provider opened (its rate limiter's Redis client);
        `cloud` is what the provider says of itself, for the start-up log."""
        self.cloud = cloud
        self.settings = settings
        self._close_provider = close_provider
        self.redis = redis
        self.source = source
        self.maintainer = maintainer
        self.provider = provider
        self.allocator = allocator
        self.metrics = metrics
        self._slots = asyncio.Semaphore(settings.parallel_nodes)
        self._running: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self._leak_suspects: set[str] = set()  # interfaces the last collection found leaked
        self.lease = ExporterLease(redis, WORKER_EXPORTER_KEY, settings.consumer_name, EXPORTER_LEASE_SECONDS)
        metrics.resync_interval.set(settings.resync_interval_seconds)

    async def maintain_node(self, node: str, *, settle: bool = False, wait_for_lock: float = 0.1) -> bool:
        """Maintains `node` holding its lock, so no two workers work on one node at once.
        Returns False when another worker holds the node: that one maintains it again afterwards.

        Work asked while the node is held is not lost: the caller that finds the lock taken leaves
        a mark, and the holder, after letting go, takes the node again if it finds the mark (the
        caller tries the lock once more after marking, in case the holder let go in between).

        Each time the lock is taken it comes with a fencing token that every change of the node
        carries: should the lock be lost (a Redis failover) and another worker take it, the
        allocator refuses this one's changes from then on, and it stops (returns as if busy).
        """
        mark = f"{contract.node_prefix(node)}:again"
        maintained = False
        while True:
            lock = self.redis.lock(
                f"{contract.node_prefix(node)}:worklock",
                timeout=self.settings.node_lock_seconds,
                blocking_timeout=wait_for_lock,
            )
            if not await lock.acquire():
                await self.redis.set(mark, "1", px=int(self.settings.node_lock_seconds * 4000))
                if not await lock.acquire(blocking_timeout=0.01):
                    return maintained
            try:
                await self.redis.delete(mark)  # what was asked so far, this run covers
                with fencing.holding(await fencing.take_token(self.redis, node)):
                    await self._maintain_holding(lock, node, settle)
                maintained = True
            except AllocatorError as exc:
                if exc.reason != ErrorReason.STALE_FENCING_TOKEN:
                    raise
                log.warning("node %s: another worker holds it now (%s); this one stops", node, exc.message)
                return maintained
            finally:
                with contextlib.suppress(Exception):
                    await lock.release()
            if not await self.redis.exists(mark):
                return True
            settle = False

    async def _maintain_holding(self, lock: Lock, node: str, settle: bool) -> None:
        work = asyncio.create_task(self.maintainer.maintain(node, settle_reservations=settle))
        try:
            # Renew the lease well before it runs out; if it is lost, stop: another worker may start.
            while True:
                done, _ = await asyncio.wait({work}, timeout=self.settings.node_lock_seconds / 3)
                if done:
                    break
                if not await lock.reacquire():
                    raise TimeoutError(f"lost the lock of node {node}")
            outcome = work.result()
            if outcome.actions:
                self.metrics.maintenance_seconds.observe(outcome.seconds)
                self.metrics.maintenance_cloud_seconds.observe(outcome.cloud_seconds)
                log.info(
                    "node %s: %s (%s; %.0f ms, %.0f ms in the cloud)",
                    node,
                    "; ".join(outcome.actions),
                    outcome.reason or "done",
                    outcome.seconds * 1000,
                    outcome.cloud_seconds * 1000,
                )
        finally:
            if not work.done():
                work.cancel()

    async def handle(self, delivery: Delivery) -> None:
        event = delivery.event
        self.metrics.queue_lag.observe(max(time.time() - event.published_at_ms / 1000, 0.0))
        if (event.pool or CLOUD_POOL) != CLOUD_POOL:
            await self.source.ack(delivery)  # only the default pool is filled from the cloud
            self.metrics.events.labels("ignored").inc()
            return
        # Cleared before the work: a change from now on publishes a new event. If another worker
        # holds the node, it maintains the node again once it is done (see maintain_node).
        await self.source.take(delivery)
        try:
            with at_priority(Priority.REFILL):  # until the node's state says otherwise
                maintained = await self.maintain_node(event.node)
            if not maintained:
                await self.source.ack(delivery)
                self.metrics.events.labels("node-busy").inc()
                return
        except AllocatorError as exc:
            if exc.reason == ErrorReason.NODE_NOT_FOUND:
                await self.source.ack(delivery)
                self.metrics.events.labels("node-gone").inc()
                return
            log.warning("node %s: allocator call failed (%s); the event will be retried", event.node, exc)
            self.metrics.events.labels("failed").inc()
            return
        except Exception as exc:  # noqa: BLE001 - left pending: claimed again, dead-lettered after N tries
            log.warning(
                "node %s: maintenance failed (%s: %s); the event will be retried", event.node, type(exc).__name__, exc
            )
            self.metrics.events.labels("failed").inc()
            await self._keep_error(event.node, exc)
            return
        await self.source.ack(delivery)
        self.metrics.events.labels("done").inc()

    async def consume(self) -> None:
        started = False
        while not self.stopping.is_set():
            try:
                if not started:  # inside the loop: a Redis away at start-up is waited for, like later
                    await self.source.start()
                    started = True
                deliveries = await self.source.fetch(self.settings.parallel_nodes, block_ms=1000)
            except Exception as exc:  # noqa: BLE001 - Redis away: retry until it is back
                log.warning("reading events failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 1.0)
                continue
            for delivery in deliveries:
                await self._slots.acquire()
                task = asyncio.create_task(self.handle(delivery))
                self._running.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def resync_once(self) -> None:
        """Every node, biggest deficit first: reconciled with the cloud, deficits and excess attended."""
        started = time.monotonic()
        nodes = await self.allocator.list_nodes(order_by_watermark=True)
        self.node_gauges(nodes)
        with at_priority(Priority.HOUSEKEEPING):
            try:
                instances = (
                    self.provider.node_instance(n.name, n.config.instance_id, n.config.instance_type) for n in nodes
                )
                cost = await asyncio.to_thread(self.maintainer.view.refresh, [i[0] for i in instances if i is not None])
                log.info(
                    "cloud view refreshed: %d VPC(s), %d interface(s), %d instance(s) described, %.2f s",
                    cost.vpcs,
                    cost.interfaces,
                    cost.instances_described,
                    cost.seconds,
                )
            except Exception as exc:  # noqa: BLE001 - the nodes are then read one by one
                log.warning("cloud view refresh failed (%s): nodes are read one by one", exc)
        # Several nodes at once (the view spares their cloud reads, the allocator's round trips
        # remain), in order, but never more than half the slots: events keep the rest.
        resync_slots = asyncio.Semaphore(max(1, self.settings.parallel_nodes // 2))

        async def visit(name: str) -> None:
            async with resync_slots, self._slots:
                if self.stopping.is_set():
                    return
                try:
                    with at_priority(Priority.HOUSEKEEPING):  # until the node's state says otherwise
                        await self.maintain_node(name, settle=True, wait_for_lock=self.settings.node_lock_seconds)
                except Exception as exc:  # noqa: BLE001 - one node's failure does not stop the others
                    log.warning("resync of node %s failed: %s", name, exc)
                    if not isinstance(exc, AllocatorError):
                        await self._keep_error(name, exc)

        await asyncio.gather(*(visit(node.name) for node in nodes))
        if self.stopping.is_set():
            return
        self.metrics.resync_total.inc()
        self.metrics.resync_duration.set(time.monotonic() - started)

    async def _keep_error(self, node: str, exc: Exception) -> None:
        """A failed maintenance shows on the node (GetNode, ListNodes) until one succeeds."""
        operation = getattr(exc, "operation", "")
        where = f" in {operation}" if operation else ""
        await self.maintainer.report_error(node, f"{type(exc).__name__}{where}: {exc}")

    def node_gauges(self, nodes: Sequence[PoolNode]) -> None:
        """Nodes by category and each node's interfaces, from the allocator's view of them."""
        self.metrics.nodes.labels("total").set(len(nodes))
        self.metrics.nodes.labels("in-deficit").set(sum(1 for n in nodes if n.stats.needed_ipv4 > 0))
        at_capacity = sum(1 for n in nodes if n.stats.deficit_reason == DeficitReason.AT_CAPACITY)
        self.metrics.nodes.labels(DeficitReason.AT_CAPACITY).set(at_capacity)
        self.metrics.interfaces.clear()
        for n in nodes:
            for state, value in (
                ("attached", len(n.interfaces)),
                ("available", n.stats.interface_candidates),
                ("remaining", n.stats.remaining_interfaces),
                ("empty-slots", n.stats.empty_interface_slots),
            ):
                self.metrics.interfaces.labels(n.name, state).set(value)

    async def export_cluster_gauges(self) -> None:
        """Takes or renews the exporter lease; the holder refreshes the node gauges between resyncs."""
        holding = await self.lease.hold()
        self.metrics.exporting(holding)
        if holding:
            self.node_gauges(await self.allocator.list_nodes())

    async def collect_leaked_interfaces(self) -> int:
        """Deletes our interfaces found leaked (detached past their grace period since creation, or
        held by the instance of no node: `list_leaked_interfaces`) by two collections in a row, at
        most 25 a run, as Cilium: one detached for a moment survives. Returns how many this run
        found leaked."""
        with at_priority(Priority.HOUSEKEEPING):
            return await self._collect_leaked_interfaces()

    async def _collect_leaked_interfaces(self) -> int:
        nodes = await self.allocator.list_nodes()
        instances = (self.provider.node_instance(n.name, n.config.instance_id, n.config.instance_type) for n in nodes)
        leaked = await asyncio.to_thread(
            self.provider.list_leaked_interfaces,
            self.settings.leaked_interface_grace_seconds,
            {i[0] for i in instances if i is not None},
        )
        seen_before, self._leak_suspects = self._leak_suspects, {i.id for i in leaked}
        for interface in [i for i in leaked if i.id in seen_before][:25]:
            if await asyncio.to_thread(self.provider.delete_interface, interface.id):
                log.info("deleted leaked interface %s (%s)", interface.id, dict(interface.tags))
                self.metrics.leaked_interfaces_deleted.inc()
        return len(leaked)

    async def every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        """Runs `job` every `seconds` until the stop; a failure is logged and the next run comes."""
        while not self.stopping.is_set():
            try:
                await job()
            except Exception as exc:  # noqa: BLE001 - periodic jobs keep going
                log.warning("%s failed: %s", getattr(job, "__name__", job), exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), seconds)

    async def trim_events(self) -> None:
        await self.source.trim()

    async def heartbeat(self) -> None:
        """Renews this worker's heartbeat: while it lives, status shows the worker alive and no other
        worker removes it from the consumer group."""
        await liveness.beat(self.redis, self.settings.consumer_name, self.settings.heartbeat_seconds)

    async def leave(self) -> None:
        """Drops the heartbeat at a clean stop: status shows the worker gone at once."""
        with contextlib.suppress(Exception):
            await liveness.leave(self.redis, self.settings.consumer_name)

    async def close(self) -> None:
        """Closes the allocator client, the Redis connections and the provider's (after `drain`)."""
        await self.allocator.close()
        await self.redis.aclose()
        await asyncio.to_thread(self._close_provider)

    async def drain(self, timeout: float) -> None:
        """Lets the nodes in progress finish for up to `timeout` seconds, then cancels the rest
        (their events stay pending: another worker claims them)."""
        if self._running:
            await asyncio.wait(self._running, timeout=timeout)
        if await cancel_until_done(self._running, timeout=10.0):
            log.warning("worker: node maintenance still running after the stop")


def build_worker(
    settings: WorkerSettings,
    *,
    registry: CollectorRegistry | None = None,
    provider: CloudProvider | None = None,
) -> Worker:
    """The worker and everything it talks to, from its settings: `run` and the tests build it here.
    `provider` replaces the AWS provider the settings describe; `Worker.close` closes the rest."""
    metrics = WorkerMetrics(registry if registry is not None else CollectorRegistry())
    close_provider: Callable[[], None] = _nothing
    cloud = "a provider given by the caller"
    if provider is None:
        wiring = ProviderWiring(
            cluster=settings.cluster_name,
            observer=metrics.cloud.observer(settings.cloud),
            connect_redis=lambda: connect_sync(
                settings.redis_url,
                cluster=settings.redis_cluster,
                sentinels=settings.redis_sentinels,
                sentinel_master=settings.redis_sentinel_master,
            ),
        )
        built = build_provider(settings.cloud, settings, wiring)
        provider, close_provider, cloud = built.provider, built.close, built.description
    redis = redis_client.connect(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=5.0,
        max_connections=32,
        sentinels=settings.redis_sentinels,
        sentinel_master=settings.redis_sentinel_master,
    )
    allocator = GrpcAllocator(
        AsyncIpamClient(
            settings.grpc_address,
            token=settings.admin_token.get_secret_value() or None,
            timeout=10.0,
            tls=bool(settings.tls_ca_file),
            tls_ca=settings.tls_ca_file or None,
        )
    )
    source = RedisStreamSource(
        redis,
        group=settings.consumer_group,
        consumer=settings.consumer_name,
        max_deliveries=settings.max_deliveries,
        claim_idle_ms=int(settings.claim_idle_seconds * 1000),
        on_dead_letter=lambda _: metrics.events_dead_lettered.inc(),
    )
    view = CloudView(provider, max_age_seconds=settings.cloud_view_max_age_seconds)
    metrics.cloud_view_age.set_function(lambda: min(view.age(), 1e9))
    maintainer = NodeMaintainer(
        provider,
        allocator,
        metrics,
        stale_reservation_seconds=settings.stale_reservation_seconds,
        check_conflicts=settings.checks_address_conflicts,
        excess_release_delay_seconds=settings.excess_release_delay_seconds,
        view=view,
        prefix_delegation=settings.prefix_delegation,
        prefix_backoff_seconds=settings.prefix_backoff_seconds,
    )
    return Worker(
        settings, redis, source, maintainer, provider, allocator, metrics, close_provider=close_provider, cloud=cloud
    )


def _nothing() -> None:
    """A provider given from outside is closed by whoever made it."""


async def run(settings: WorkerSettings) -> None:
    registry = CollectorRegistry()
    if settings.metrics_address:
        host, port = split_host_port(settings.metrics_address)
        start_http_server(port, addr=host, registry=registry)
    worker = build_worker(settings, registry=registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    tasks = [
        asyncio.create_task(worker.consume()),
        asyncio.create_task(worker.every(settings.resync_interval_seconds, worker.resync_once)),
        asyncio.create_task(worker.every(EXPORTER_LEASE_SECONDS / 3, worker.export_cluster_gauges)),
        asyncio.create_task(worker.every(settings.gc_interval_seconds, worker.collect_leaked_interfaces)),
        asyncio.create_task(worker.every(30.0, worker.trim_events)),
        asyncio.create_task(worker.every(settings.heartbeat_seconds / 3, worker.heartbeat)),
    ]
    log.info(
        "worker %s consuming %s for the allocator at %s (cloud %s: %s)",
        settings.consumer_name,
        contract.EVENTS_STREAM,
        settings.grpc_address,
        settings.cloud,
        worker.cloud,
    )
    await worker.stopping.wait()
    log.info("worker stopping: finishing the nodes in progress")
    await worker.drain(timeout=30.0)
    if await cancel_until_done(tasks, timeout=10.0):
        log.warning("worker: background tasks still running 10 s after the stop")
    await worker.leave()
    await worker.close()
