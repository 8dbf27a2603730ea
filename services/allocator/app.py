"""Wiring (`build_allocator`: settings -> Redis store -> service -> gRPC server, with health,
reflection and metrics) and lifecycle (`serve`: start, run until a signal, stop gracefully)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from ipam.v1 import allocator_pb2, allocator_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from services.core import redis_client
from services.core.metrics import ALLOCATOR_EXPORTER_KEY, ExporterLease
from services.core.net import split_host_port
from services.core.redis_client import RedisClient
from services.core.tasks import cancel_until_done

from .events import RedisStreamQueue
from .metrics import AllocatorMetrics
from .refill import RefillWatcher
from .service import AllocatorService
from .settings import AllocatorSettings
from .store.pipelining import PipelinedConnection
from .store.redis_store import RedisStore
from .timers import TimerSweeper
from .transport.auth import TokenAuthInterceptor
from .transport.limits import ServerGuard
from .transport.reflection import enable_reflection
from .transport.servicer import AllocatorServicer, NodeManagerServicer

log = logging.getLogger("ipam.allocator")

# Calls gRPC core queues before the event loop takes them (its default starts dropping at 1,000).
_MAX_PENDING_CALLS = 20_000

SERVICE_NAMES = (
    allocator_pb2.DESCRIPTOR.services_by_name["Allocator"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["NodeManager"].full_name,
)


def server_credentials(settings: AllocatorSettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is set; mutual TLS when a client CA is set too."""
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def replica_name(settings: AllocatorSettings, worker_index: int) -> str:
    """How this process names itself in its log: the replica (or hostname), and with --workers N
    the process among them (`2/1`)."""
    name = settings.replica or socket.gethostname()
    return f"{name}/{worker_index}" if settings.workers > 1 else name


@dataclass
class Allocator:
    """One allocator process, wired and not yet started: what `serve` runs and stops."""

    settings: AllocatorSettings
    name: str  # how this process names itself in its log
    worker_index: int
    metrics: AllocatorMetrics
    client: RedisClient
    store: RedisStore
    refills: RefillWatcher
    service: AllocatorService
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    tls: bool


def build_allocator(settings: AllocatorSettings, *, worker_index: int = 0) -> Allocator:
    """The allocator and everything it talks to, from its settings: Redis, the store, the service,
    the gRPC server with its servicers, health and reflection, the port bound."""
    metrics = AllocatorMetrics()
    client = redis_client.connect(
        settings.redis_url,
        cluster=settings.redis_cluster,
        timeout_s=settings.redis_timeout_seconds,
        max_connections=settings.redis_max_connections,
        sentinels=settings.redis_sentinels,
        sentinel_master=settings.redis_sentinel_master,
    )
    store = RedisStore(
        client,
        reuse_cooldown_ms=int(settings.reuse_cooldown_seconds * 1000),
        pipelined=(
            PipelinedConnection.from_url(
                settings.redis_url,
                timeout_s=settings.redis_timeout_seconds,
                resolve=redis_client.master_resolver(client),
                min_replicas=settings.redis_min_replicas,
                replica_wait_s=settings.redis_replica_wait_seconds,
            )
            if settings.redis_pipeline_scripts and not settings.redis_cluster
            else None
        ),
        timeout_s=settings.redis_timeout_seconds,
        min_replicas=settings.redis_min_replicas,
        replica_wait_s=settings.redis_replica_wait_seconds,
    )
    queue = RedisStreamQueue(store, coalesce_seconds=settings.event_coalesce_seconds)
    refills = RefillWatcher(store)
    service = AllocatorService(
        store, queue, refills, ipv4_enabled=settings.ipv4_enabled, ipv6_enabled=settings.ipv6_enabled, metrics=metrics
    )

    auth = TokenAuthInterceptor(settings.client_token_set, settings.admin_token_set)
    if not auth.enabled:
        log.warning(
            "no tokens configured: every caller may use every call (set IPAM_CLIENT_TOKENS and IPAM_ADMIN_TOKENS)"
        )
    server = grpc.aio.server(
        # The guard sheds load itself (with a reason, never the health checks), so gRPC's own
        # maximum_concurrent_rpcs is not set.
        interceptors=[ServerGuard(settings.max_concurrent_rpcs), auth],
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # Calls the event loop has not picked up yet wait in gRPC core's queue, which drops some of
            # them at random past 1,000 (as CANCELLED, with no reason): let them wait for the guard.
            ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * _MAX_PENDING_CALLS),
        ],
    )
    allocator_pb2_grpc.add_AllocatorServicer_to_server(AllocatorServicer(service, metrics, auth.is_admin), server)
    nodes_pb2_grpc.add_NodeManagerServicer_to_server(NodeManagerServicer(service, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    credentials = server_credentials(settings)
    if credentials:
        server.add_secure_port(settings.grpc_address, credentials)
    else:
        server.add_insecure_port(settings.grpc_address)
    return Allocator(
        settings=settings,
        name=replica_name(settings, worker_index),
        worker_index=worker_index,
        metrics=metrics,
        client=client,
        store=store,
        refills=refills,
        service=service,
        server=server,
        health=health_servicer,
        tls=credentials is not None,
    )


async def serve(settings: AllocatorSettings, *, worker_index: int = 0, ready: asyncio.Event | None = None) -> None:
    """Runs one allocator process until SIGTERM/SIGINT; in-flight calls get the grace period."""
    allocator = build_allocator(settings, worker_index=worker_index)
    tasks = await _start(allocator)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await _stop(allocator, tasks)


async def _start(allocator: Allocator) -> list[asyncio.Task[None]]:
    """Starts serving, then the metrics endpoint and the background tasks (returned)."""
    settings, metrics, service = allocator.settings, allocator.metrics, allocator.service
    await allocator.server.start()
    if settings.metrics_address:  # after the gRPC port is bound: a metrics answer means serving
        host, port = split_host_port(settings.metrics_address)
        start_http_server(port + allocator.worker_index, addr=host, registry=metrics.registry)
    sweeper = TimerSweeper(
        service, interval_s=settings.timer_sweep_seconds, full_scan_s=settings.timer_full_scan_seconds
    )
    tasks = [
        asyncio.create_task(sweeper.run()),
        asyncio.create_task(_watch_health(allocator.store, allocator.health)),
    ]
    if settings.pool_metrics_seconds > 0:
        lease = ExporterLease(
            allocator.client,
            ALLOCATOR_EXPORTER_KEY,
            f"{socket.gethostname()}-{os.getpid()}",
            ttl_seconds=max(3 * settings.pool_metrics_seconds, 5.0),
        )
        tasks.append(asyncio.create_task(_sample_pools(service, metrics, settings.pool_metrics_seconds, lease)))
    allocator.refills.start()
    log.info(
        "allocator %s listening on %s (%s), metrics on %s",
        allocator.name,
        settings.grpc_address,
        "TLS" if allocator.tls else "plaintext",
        settings.metrics_address or "-",
    )
    return tasks


async def _stop(allocator: Allocator, tasks: list[asyncio.Task[None]]) -> None:
    """Health says NOT_SERVING, in-flight calls get the grace period, then the rest stops."""
    log.info("allocator %s shutting down: finishing in-flight calls", allocator.name)
    await allocator.health.enter_graceful_shutdown()
    await allocator.server.stop(allocator.settings.shutdown_grace_seconds)
    if await cancel_until_done(tasks, timeout=5.0):
        log.warning("allocator %s: background tasks still running after 5 s", allocator.name)
    await allocator.refills.stop()
    with contextlib.suppress(Exception):
        await allocator.store.close()


async def _sample_pools(
    service: AllocatorService, metrics: AllocatorMetrics, interval: float, lease: ExporterLease
) -> None:
    """Per-node pool levels of the default pool as gauges (Cilium's available/used/needed per node),
    and the events stream's pending and dead-lettered counts; set and exported only while this
    replica holds the exporter lease, so that a sum over every replica counts each pool once."""
    while True:
        try:
            holding = await lease.hold()
            metrics.exporting(holding)
            if holding:
                await _set_cluster_gauges(service, metrics)
        except Exception as exc:  # noqa: BLE001 - metrics are best effort
            log.debug("sampling pools failed: %s", exc)
        await asyncio.sleep(interval)


async def _set_cluster_gauges(service: AllocatorService, metrics: AllocatorMetrics) -> None:
    pools = await service.pool_stats()
    metrics.pool_ips.clear()
    for node, s in pools:
        for family, levels in (
            (
                "ipv4",
                {
                    "available": s.available_ips,
                    "used": s.used_ips,
                    "needed": s.needed_ipv4,
                    "excess": s.excess_ipv4,
                    "cooling": s.cooling_ips,
                },
            ),
            (
                "ipv6",
                {
                    "available": s.available_ipv6,
                    "used": s.used_ipv6,
                    "needed": s.needed_ipv6,
                    "excess": s.excess_ipv6,
                },
            ),
        ):
            for state, value in levels.items():
                metrics.pool_ips.labels(node, "default", family, state).set(value)
    pending, dead = await service.event_counts()
    metrics.events.labels("pending").set(pending)
    metrics.events.labels("dead").set(dead)


async def _watch_health(store: RedisStore, servicer: health.aio.HealthServicer) -> None:
    """SERVING while Redis answers, NOT_SERVING while it does not."""
    while True:
        try:
            await store.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:  # noqa: BLE001
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await servicer.set(name, status)
        await asyncio.sleep(2.0)
