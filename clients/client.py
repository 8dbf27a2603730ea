"""Typed Python clients of the ipam allocator: `IpamClient` (blocking) and `AsyncIpamClient` (asyncio).

Both talk to the `ipam.v1.Allocator` and `ipam.v1.NodeManager` services through the generated stubs
and differ only in `def` versus `async def`. What grpcio does itself is left to it: retries on
UNAVAILABLE (the channel's service config), balancing across replicas (`round_robin`), deadlines.

    with IpamClient("10.0.0.1:50051,10.0.0.2:50051", token="s3cret") as ipam:
        result = ipam.allocate_next("node-a", owner="pod-1", family=Family.IPV4)
        print(result.ipv4.ip)

Every failed call raises `IpamClientError` with the status code and the server's stable reason (an
`ErrorReason` of `services.core.reasons` when the server sent one this client knows).

Retries: grpc retries UNAVAILABLE, which the allocator answers only when nothing was changed. A change
that reached Redis without an answer comes back as ABORTED `OUTCOME_UNKNOWN` ("it may have been
applied"), which only `allocate_next` and `allocate` retry: each logical call carries an idempotency
key (the caller's, else one made here) that all its tries share, so a retry gets the first try's
address and never a second one. Other calls raise it; read back (Dump) before acting again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import allocator_pb2_grpc, nodes_pb2_grpc
from ipam.v1 import nodes_pb2 as nodes_pb
from services.core.reasons import ErrorReason

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncIpamClient",
    "Family",
    "IpamClient",
    "IpamClientError",
    "channel_options",
    "node_spec",
    "parse_target",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
SERVICES = ("ipam.v1.Allocator", "ipam.v1.NodeManager")
# Schemes of gRPC's built-in name resolvers; a target starting with one is used as given.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

_R = TypeVar("_R")


class Family(IntEnum):
    """Address family; the values are those of `ipam.v1.Family`. UNSPECIFIED = every enabled family."""

    UNSPECIFIED = 0
    IPV4 = 1
    IPV6 = 2


class IpamClientError(Exception):
    """A failed call: gRPC status code, the server's ErrorInfo reason ("" when it sent none), message.

    A reason this client knows is an `ErrorReason` (equal to its wire string); a newer server's
    reason it does not know stays the plain string."""

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(code, reason, message)
        self.code = code
        self.reason: ErrorReason | str = _known_reason(reason)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        """`RESOURCE_EXHAUSTED POOL_EMPTY: pool default of node n1 has no free IPv4 address`, on one line."""
        head = self.code.name if not self.reason or self.reason == self.code.name else f"{self.code.name} {self.reason}"
        message = " ".join(self.message.split())
        return f"{head}: {message}" if message else head

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> IpamClientError:
        """Read code, message and the `google.rpc.ErrorInfo` detail of a failed call (sync or aio)."""
        # Sync (grpc.Call) and aio (AioRpcError) call errors both carry code(), details(), trailing_metadata().
        call = cast(grpc.Call, error)
        code, message = call.code(), call.details() or ""
        try:
            status = rpc_status.from_call(call)
        except ValueError:  # a status detail that contradicts the call's own status: ignore the detail
            status = None
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return cls(code, info.reason, status.message or message, info.metadata)
        return cls(code, "", message)


def _known_reason(reason: str) -> ErrorReason | str:
    try:
        return ErrorReason(reason)
    except ValueError:
        return reason


def parse_target(address: str) -> str:
    """The gRPC target for one address or a comma-separated list of allocator replicas.

    "host:port" is used as given (grpc resolves the name; round_robin spreads calls over every address
    it resolves to), as is anything with a resolver scheme ("dns:///…", "unix:…", "ipv4:…"). A list of
    IP literals becomes one multi-address target: "10.0.0.1:50051,10.0.0.2:50051" →
    "ipv4:10.0.0.1:50051,10.0.0.2:50051"; "[::1]:1,[::1]:2" → "ipv6:[::1]:1,[::1]:2".
    """
    address = address.strip()
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if not parts:
        raise ValueError("no allocator address given")
    if len(parts) == 1:
        return parts[0]
    if address.startswith(_SCHEMES):
        return address
    versions: set[int] = set()
    endpoints: list[tuple[str, str]] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"{part!r} is not host:port")
        host = host.removeprefix("[").removesuffix("]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            # grpc's multi-address target takes IP literals only; a name must resolve to every replica.
            raise ValueError(
                f"{host!r} is not an IP address: list replicas by IP, or give one DNS name that resolves to all"
            ) from None
        versions.add(ip.version)
        endpoints.append((str(ip), port))
    if len(versions) > 1:
        raise ValueError("cannot mix IPv4 and IPv6 addresses in one target")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in endpoints)
    return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in endpoints)


def channel_options(max_attempts: int = 5, tls_server_name: str | None = None) -> list[tuple[str, Any]]:
    """Channel arguments: round_robin over every resolved address, and grpc's own retry of UNAVAILABLE.

    `max_attempts` counts the first try (grpc caps it at 5); below 2 there are no retries.
    """
    service_config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if max_attempts >= 2:
        service_config["methodConfig"] = [
            {
                "name": [{"service": service} for service in SERVICES],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1 if max_attempts >= 2 else 0),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


def node_spec(
    name: str,
    *,
    instance_id: str = "",
    instance_type: str = "",
    availability_zone: str = "",
    vpc_id: str = "",
    subnet_ids: Iterable[str] = (),
    subnet_tags: Mapping[str, str] | None = None,
    security_group_ids: Iterable[str] = (),
    security_group_tags: Mapping[str, str] | None = None,
    first_interface_index: int = 0,
    pre_allocate: int | None = None,
    min_allocate: int = 0,
    max_allocate: int = 0,
    max_above_watermark: int = 0,
    ipv6_enabled: bool = False,
    release_excess: bool = False,
) -> nodes_pb.NodeSpec:
    """A `NodeSpec`. `pre_allocate=None` keeps the server's default (8); any number, 0 included, is explicit."""
    return nodes_pb.NodeSpec(
        name=name,
        instance_id=instance_id,
        instance_type=instance_type,
        availability_zone=availability_zone,
        vpc_id=vpc_id,
        subnet_ids=list(subnet_ids),
        subnet_tags=dict(subnet_tags or {}),
        security_group_ids=list(security_group_ids),
        security_group_tags=dict(security_group_tags or {}),
        first_interface_index=first_interface_index,
        pre_allocate=pre_allocate or 0,
        pre_allocate_set=pre_allocate is not None,
        min_allocate=min_allocate,
        max_allocate=max_allocate,
        max_above_watermark=max_above_watermark,
        ipv6_enabled=ipv6_enabled,
        release_excess=release_excess,
    )


def _release_request(
    node: str, pool: str, ip: str | None, owner: str | None, skip_sync_upstream: bool
) -> pb.ReleaseRequest:
    if (ip is None) == (owner is None):
        raise ValueError("release takes exactly one of ip or owner")
    if ip is not None:
        return pb.ReleaseRequest(node=node, pool=pool, ip=ip, skip_sync_upstream=skip_sync_upstream)
    return pb.ReleaseRequest(node=node, pool=pool, owner=owner, skip_sync_upstream=skip_sync_upstream)


def _key_of(idempotency_key: str) -> str:
    """The caller's key, else a fresh one for this logical call (shared by all its tries)."""
    return idempotency_key or f"ipam-client-{uuid.uuid4().hex}"


def _retry_delay(error: IpamClientError, attempt: int, max_attempts: int, deadline: float | None) -> float | None:
    """How long to wait before retrying a keyed call that failed with `error` on try `attempt`
    (1-based); None to give up (another failure, no tries or no time left)."""
    if error.reason != ErrorReason.OUTCOME_UNKNOWN or attempt >= max_attempts:
        return None
    delay = min(0.1 * 2 ** (attempt - 1), 2.0)
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


class _ClientBase:
    """What both clients share: target, credentials, channel arguments, bearer metadata, deadline."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        max_attempts: int = 5,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`address`: "host:port" or a comma-separated list of replicas (see `parse_target`).
        `token`: sent as `authorization: Bearer <token>` on every call. `timeout`: the default
        deadline of a call in seconds (None = none). TLS is on when `tls` is true or any TLS file is
        given: `tls_ca` = root certificates (default: the system's), `tls_cert` + `tls_key` = a client
        certificate for mutual TLS. `max_attempts`: tries per call when the server is UNAVAILABLE.
        """
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("mutual TLS needs both tls_cert and tls_key")
        self.target = parse_target(address)
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials: grpc.ChannelCredentials | None = None
        if tls or tls_ca is not None or tls_cert is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
            )
        self.max_attempts = max_attempts
        self._options = [*channel_options(max_attempts, tls_server_name), *options]
        self.channel = self._connect()
        self._allocator = allocator_pb2_grpc.AllocatorStub(self.channel)
        self._nodes = nodes_pb2_grpc.NodeManagerStub(self.channel)

    def _connect(self) -> Any:
        """Open the channel: blocking in `IpamClient`, grpc.aio in `AsyncIpamClient`."""
        raise NotImplementedError

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    def _deadline(self, timeout: float | None) -> float | None:
        """The monotonic end of a logical call (all its tries)."""
        effective = self.timeout if timeout is None else timeout
        return None if effective is None else time.monotonic() + effective


class IpamClient(_ClientBase):
    """Blocking client of the allocator (constructor: see `_ClientBase`). Thread-safe; close it (or use
    `with`) when done."""

    channel: grpc.Channel

    def _connect(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target, options=self._options)
        return grpc.secure_channel(self.target, self._credentials, options=self._options)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, rpc: Callable[..., _R], request: Any, timeout: float | None) -> _R:
        try:
            return rpc(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise IpamClientError.from_rpc_error(error) from error

    def _keyed_call(self, rpc: Callable[..., _R], request: Any, timeout: float | None) -> _R:
        """`_call`, retried on OUTCOME_UNKNOWN: the request carries an idempotency key."""
        deadline = self._deadline(timeout)
        attempt = 1
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return self._call(rpc, request, left)
            except IpamClientError as error:
                delay = _retry_delay(error, attempt, self.max_attempts, deadline)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    # -- Allocator ---------------------------------------------------------------------------------

    def allocate_next(
        self,
        node: str,
        pool: str = "",
        family: Family = Family.UNSPECIFIED,
        *,
        owner: str,
        expiration_seconds: int = 0,
        idempotency_key: str = "",
        wait_for_refill: bool = False,
        skip_sync_upstream: bool = False,
        timeout: float | None = None,
    ) -> pb.AllocateNextResponse:
        """The next free address(es) of the pool: `ipv4` and/or `ipv6` (check with `HasField`).

        A retry with the same `idempotency_key` returns the same addresses (the key belongs to this
        owner and family until they are released; without one, this call makes its own, so its own
        retries are safe). With `wait_for_refill`, an empty pool being refilled is waited for within
        the deadline instead of failing at once.
        """
        request = pb.AllocateNextRequest(
            node=node,
            pool=pool,
            family=int(family),
            owner=owner,
            expiration_seconds=expiration_seconds,
            skip_sync_upstream=skip_sync_upstream,
            idempotency_key=_key_of(idempotency_key),
            wait_for_refill=wait_for_refill,
        )
        return self._keyed_call(self._allocator.AllocateNext, request, timeout)

    def allocate(
        self,
        node: str,
        ip: str,
        owner: str,
        pool: str = "",
        *,
        skip_sync_upstream: bool = False,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> pb.AllocationResult:
        """Allocate one specific address (a retry with the same `idempotency_key` gets the same result)."""
        request = pb.AllocateRequest(
            node=node,
            pool=pool,
            ip=ip,
            owner=owner,
            skip_sync_upstream=skip_sync_upstream,
            idempotency_key=_key_of(idempotency_key),
        )
        return self._keyed_call(self._allocator.Allocate, request, timeout).result

    def release(
        self,
        node: str,
        pool: str = "",
        ip: str | None = None,
        owner: str | None = None,
        *,
        skip_sync_upstream: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        """Release one address (`ip`) or every address of an `owner`; returns the released addresses."""
        request = _release_request(node, pool, ip, owner, skip_sync_upstream)
        return list(self._call(self._allocator.Release, request, timeout).released_ips)

    def exclude_ip(self, node: str, ip: str, owner: str, pool: str = "", *, timeout: float | None = None) -> None:
        """Take an address out of circulation."""
        self._call(self._allocator.ExcludeIP, pb.ExcludeIPRequest(node=node, pool=pool, ip=ip, owner=owner), timeout)

    def start_expiration_timer(
        self, node: str, ip: str, timeout_seconds: int, pool: str = "", *, timeout: float | None = None
    ) -> str:
        """(Re)start the expiration timer of an allocated address; returns the timer's uuid."""
        request = pb.StartExpirationTimerRequest(node=node, pool=pool, ip=ip, timeout_seconds=timeout_seconds)
        return self._call(self._allocator.StartExpirationTimer, request, timeout).expiration_uuid

    def stop_expiration_timer(
        self, node: str, ip: str, expiration_uuid: str, pool: str = "", *, timeout: float | None = None
    ) -> None:
        """Stop a timer; `expiration_uuid` must be the running timer's."""
        request = pb.StopExpirationTimerRequest(node=node, pool=pool, ip=ip, expiration_uuid=expiration_uuid)
        self._call(self._allocator.StopExpirationTimer, request, timeout)

    def dump(self, node: str, pool: str = "", *, timeout: float | None = None) -> pb.DumpResponse:
        """Every allocated address of the pool (`ipv4` / `ipv6`: ip → owner) and a status line."""
        return self._call(self._allocator.Dump, pb.DumpRequest(node=node, pool=pool), timeout)

    def debug_status(self, *, timeout: float | None = None) -> str:
        """A human-readable summary of the allocator's state."""
        return self._call(self._allocator.DebugStatus, pb.DebugStatusRequest(), timeout).status

    def get_vpc_cidrs(self, node: str, *, timeout: float | None = None) -> list[str]:
        """The VPC CIDRs the worker reported for the node."""
        return list(self._call(self._allocator.GetVpcCIDRs, pb.GetVpcCIDRsRequest(node=node), timeout).cidrs)

    def ping(self, *, timeout: float | None = None) -> None:
        """A call that does nothing; raises if the allocator cannot be reached."""
        self._call(self._allocator.Ping, pb.PingRequest(), timeout)

    # -- NodeManager (admin) -----------------------------------------------------------------------

    def create_node(self, spec: nodes_pb.NodeSpec, *, timeout: float | None = None) -> nodes_pb.Node:
        """Register a node (build the spec with `node_spec`)."""
        return self._call(self._nodes.CreateNode, nodes_pb.CreateNodeRequest(spec=spec), timeout)

    def update_node(self, spec: nodes_pb.NodeSpec, *, timeout: float | None = None) -> nodes_pb.Node:
        """Replace a node's spec."""
        return self._call(self._nodes.UpdateNode, nodes_pb.UpdateNodeRequest(spec=spec), timeout)

    def delete_node(self, name: str, *, timeout: float | None = None) -> None:
        """Forget a node and its pools."""
        self._call(self._nodes.DeleteNode, nodes_pb.DeleteNodeRequest(name=name), timeout)

    def get_node(self, name: str, pool: str = "", *, timeout: float | None = None) -> nodes_pb.Node:
        """A node with its spec, interfaces and the stats of `pool`."""
        return self._call(self._nodes.GetNode, nodes_pb.GetNodeRequest(name=name, pool=pool), timeout)

    def iter_nodes(
        self, order_by_watermark: bool = False, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[nodes_pb.Node]:
        """Every node, a page (ListNodes call, `timeout` each) at a time; by name, or with
        `order_by_watermark` biggest deficit first within each page."""
        token = ""
        while True:
            request = nodes_pb.ListNodesRequest(
                order_by_watermark=order_by_watermark, page_size=page_size, page_token=token
            )
            reply = self._call(self._nodes.ListNodes, request, timeout)
            yield from reply.nodes
            token = reply.next_page_token
            if not token:
                return

    def list_nodes(self, order_by_watermark: bool = False, *, timeout: float | None = None) -> list[nodes_pb.Node]:
        """Every node (following the pages); with `order_by_watermark`, biggest deficit first."""
        return _merge_pages(self.iter_nodes(order_by_watermark, timeout=timeout), order_by_watermark)

    def resync(self, *, timeout: float | None = None) -> nodes_pb.ResyncResponse:
        """Recompute every node and publish an event for each one whose pool needs work."""
        return self._call(self._nodes.Resync, nodes_pb.ResyncRequest(), timeout)

    # -- NodeManager, worker-facing (admin) --------------------------------------------------------

    def list_dead_events(self, limit: int = 0, *, timeout: float | None = None) -> nodes_pb.ListDeadEventsResponse:
        """Dead-lettered events (newest first), with the stream's pending count and its consumers."""
        return self._call(self._nodes.ListDeadEvents, nodes_pb.ListDeadEventsRequest(limit=limit), timeout)

    def replay_dead_events(
        self, ids: Sequence[str] = (), *, all: bool = False, timeout: float | None = None
    ) -> nodes_pb.ReplayDeadEventsResponse:
        """Puts dead-lettered events back on the stream (these ids, or `all=True`)."""
        request = nodes_pb.ReplayDeadEventsRequest(ids=list(ids), all=all)
        return self._call(self._nodes.ReplayDeadEvents, request, timeout)

    def add_addresses(
        self, request: nodes_pb.AddAddressesRequest, *, timeout: float | None = None
    ) -> nodes_pb.AddAddressesResponse:
        """Addresses the worker attached in the cloud."""
        return self._call(self._nodes.AddAddresses, request, timeout)

    def set_interfaces(
        self, request: nodes_pb.SetInterfacesRequest, *, timeout: float | None = None
    ) -> nodes_pb.SetInterfacesResponse:
        """The node's interfaces as the cloud holds them."""
        return self._call(self._nodes.SetInterfaces, request, timeout)

    def set_node_error(self, node: str, error: str, *, timeout: float | None = None) -> nodes_pb.SetNodeErrorResponse:
        """The last error met maintaining the node ("" clears it)."""
        return self._call(self._nodes.SetNodeError, nodes_pb.SetNodeErrorRequest(node=node, error=error), timeout)

    def reserve_for_release(
        self, request: nodes_pb.ReserveForReleaseRequest, *, timeout: float | None = None
    ) -> nodes_pb.ReserveForReleaseResponse:
        """Reserve free addresses so they are no longer handed out (release handshake, step 1)."""
        return self._call(self._nodes.ReserveForRelease, request, timeout)

    def complete_release(
        self, request: nodes_pb.CompleteReleaseRequest, *, timeout: float | None = None
    ) -> nodes_pb.CompleteReleaseResponse:
        """The reserved addresses were unassigned in the cloud: they leave the pool."""
        return self._call(self._nodes.CompleteRelease, request, timeout)

    def abort_release(
        self, request: nodes_pb.AbortReleaseRequest, *, timeout: float | None = None
    ) -> nodes_pb.AbortReleaseResponse:
        """Give reserved addresses back to the pool."""
        return self._call(self._nodes.AbortRelease, request, timeout)

    def remove_addresses(
        self, request: nodes_pb.RemoveAddressesRequest, *, timeout: float | None = None
    ) -> nodes_pb.RemoveAddressesResponse:
        """Addresses found gone from the cloud leave the pool (allocated ones are kept)."""
        return self._call(self._nodes.RemoveAddresses, request, timeout)


class AsyncIpamClient(_ClientBase):
    """asyncio client of the allocator (grpc.aio): the methods of `IpamClient`, awaitable (constructor:
    see `_ClientBase`).

    Create it inside the event loop that uses it; `await client.close()` (or `async with`) when done.
    """

    channel: grpc.aio.Channel

    def _connect(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, self._credentials, options=self._options)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, rpc: Callable[..., Awaitable[_R]], request: Any, timeout: float | None) -> _R:
        try:
            return await rpc(request, **self._call_options(timeout))
        except grpc.RpcError as error:
            raise IpamClientError.from_rpc_error(error) from error

    async def _keyed_call(self, rpc: Callable[..., Awaitable[_R]], request: Any, timeout: float | None) -> _R:
        """See `IpamClient._keyed_call`."""
        deadline = self._deadline(timeout)
        attempt = 1
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return await self._call(rpc, request, left)
            except IpamClientError as error:
                delay = _retry_delay(error, attempt, self.max_attempts, deadline)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    # -- Allocator ---------------------------------------------------------------------------------

    async def allocate_next(
        self,
        node: str,
        pool: str = "",
        family: Family = Family.UNSPECIFIED,
        *,
        owner: str,
        expiration_seconds: int = 0,
        idempotency_key: str = "",
        wait_for_refill: bool = False,
        skip_sync_upstream: bool = False,
        timeout: float | None = None,
    ) -> pb.AllocateNextResponse:
        """See `IpamClient.allocate_next`."""
        request = pb.AllocateNextRequest(
            node=node,
            pool=pool,
            family=int(family),
            owner=owner,
            expiration_seconds=expiration_seconds,
            skip_sync_upstream=skip_sync_upstream,
            idempotency_key=_key_of(idempotency_key),
            wait_for_refill=wait_for_refill,
        )
        return await self._keyed_call(self._allocator.AllocateNext, request, timeout)

    async def allocate(
        self,
        node: str,
        ip: str,
        owner: str,
        pool: str = "",
        *,
        skip_sync_upstream: bool = False,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> pb.AllocationResult:
        """Allocate one specific address (a retry with the same `idempotency_key` gets the same result)."""
        request = pb.AllocateRequest(
            node=node,
            pool=pool,
            ip=ip,
            owner=owner,
            skip_sync_upstream=skip_sync_upstream,
            idempotency_key=_key_of(idempotency_key),
        )
        return (await self._keyed_call(self._allocator.Allocate, request, timeout)).result

    async def release(
        self,
        node: str,
        pool: str = "",
        ip: str | None = None,
        owner: str | None = None,
        *,
        skip_sync_upstream: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        """Release one address (`ip`) or every address of an `owner`; returns the released addresses."""
        request = _release_request(node, pool, ip, owner, skip_sync_upstream)
        return list((await self._call(self._allocator.Release, request, timeout)).released_ips)

    async def exclude_ip(self, node: str, ip: str, owner: str, pool: str = "", *, timeout: float | None = None) -> None:
        """Take an address out of circulation."""
        request = pb.ExcludeIPRequest(node=node, pool=pool, ip=ip, owner=owner)
        await self._call(self._allocator.ExcludeIP, request, timeout)

    async def start_expiration_timer(
        self, node: str, ip: str, timeout_seconds: int, pool: str = "", *, timeout: float | None = None
    ) -> str:
        """(Re)start the expiration timer of an allocated address; returns the timer's uuid."""
        request = pb.StartExpirationTimerRequest(node=node, pool=pool, ip=ip, timeout_seconds=timeout_seconds)
        return (await self._call(self._allocator.StartExpirationTimer, request, timeout)).expiration_uuid

    async def stop_expiration_timer(
        self, node: str, ip: str, expiration_uuid: str, pool: str = "", *, timeout: float | None = None
    ) -> None:
        """Stop a timer; `expiration_uuid` must be the running timer's."""
        request = pb.StopExpirationTimerRequest(node=node, pool=pool, ip=ip, expiration_uuid=expiration_uuid)
        await self._call(self._allocator.StopExpirationTimer, request, timeout)

    async def dump(self, node: str, pool: str = "", *, timeout: float | None = None) -> pb.DumpResponse:
        """Every allocated address of the pool (`ipv4` / `ipv6`: ip → owner) and a status line."""
        return await self._call(self._allocator.Dump, pb.DumpRequest(node=node, pool=pool), timeout)

    async def debug_status(self, *, timeout: float | None = None) -> str:
        """A human-readable summary of the allocator's state."""
        return (await self._call(self._allocator.DebugStatus, pb.DebugStatusRequest(), timeout)).status

    async def get_vpc_cidrs(self, node: str, *, timeout: float | None = None) -> list[str]:
        """The VPC CIDRs the worker reported for the node."""
        response = await self._call(self._allocator.GetVpcCIDRs, pb.GetVpcCIDRsRequest(node=node), timeout)
        return list(response.cidrs)

    async def ping(self, *, timeout: float | None = None) -> None:
        """A call that does nothing; raises if the allocator cannot be reached."""
        await self._call(self._allocator.Ping, pb.PingRequest(), timeout)

    # -- NodeManager (admin) -----------------------------------------------------------------------

    async def create_node(self, spec: nodes_pb.NodeSpec, *, timeout: float | None = None) -> nodes_pb.Node:
        """Register a node (build the spec with `node_spec`)."""
        return await self._call(self._nodes.CreateNode, nodes_pb.CreateNodeRequest(spec=spec), timeout)

    async def update_node(self, spec: nodes_pb.NodeSpec, *, timeout: float | None = None) -> nodes_pb.Node:
        """Replace a node's spec."""
        return await self._call(self._nodes.UpdateNode, nodes_pb.UpdateNodeRequest(spec=spec), timeout)

    async def delete_node(self, name: str, *, timeout: float | None = None) -> None:
        """Forget a node and its pools."""
        await self._call(self._nodes.DeleteNode, nodes_pb.DeleteNodeRequest(name=name), timeout)

    async def get_node(self, name: str, pool: str = "", *, timeout: float | None = None) -> nodes_pb.Node:
        """A node with its spec, interfaces and the stats of `pool`."""
        return await self._call(self._nodes.GetNode, nodes_pb.GetNodeRequest(name=name, pool=pool), timeout)

    async def iter_nodes(
        self, order_by_watermark: bool = False, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[nodes_pb.Node]:
        """Every node, a page (ListNodes call, `timeout` each) at a time; by name, or with
        `order_by_watermark` biggest deficit first within each page."""
        token = ""
        while True:
            request = nodes_pb.ListNodesRequest(
                order_by_watermark=order_by_watermark, page_size=page_size, page_token=token
            )
            reply = await self._call(self._nodes.ListNodes, request, timeout)
            for node in reply.nodes:
                yield node
            token = reply.next_page_token
            if not token:
                return

    async def list_nodes(
        self, order_by_watermark: bool = False, *, timeout: float | None = None
    ) -> list[nodes_pb.Node]:
        """Every node (following the pages); with `order_by_watermark`, biggest deficit first."""
        pages = [n async for n in self.iter_nodes(order_by_watermark, timeout=timeout)]
        return _merge_pages(pages, order_by_watermark)

    async def resync(self, *, timeout: float | None = None) -> nodes_pb.ResyncResponse:
        """Recompute every node and publish an event for each one whose pool needs work."""
        return await self._call(self._nodes.Resync, nodes_pb.ResyncRequest(), timeout)

    # -- NodeManager, worker-facing (admin) --------------------------------------------------------

    async def list_dead_events(
        self, limit: int = 0, *, timeout: float | None = None
    ) -> nodes_pb.ListDeadEventsResponse:
        """Dead-lettered events (newest first), with the stream's pending count and its consumers."""
        return await self._call(self._nodes.ListDeadEvents, nodes_pb.ListDeadEventsRequest(limit=limit), timeout)

    async def replay_dead_events(
        self, ids: Sequence[str] = (), *, all: bool = False, timeout: float | None = None
    ) -> nodes_pb.ReplayDeadEventsResponse:
        """Puts dead-lettered events back on the stream (these ids, or `all=True`)."""
        request = nodes_pb.ReplayDeadEventsRequest(ids=list(ids), all=all)
        return await self._call(self._nodes.ReplayDeadEvents, request, timeout)

    async def add_addresses(
        self, request: nodes_pb.AddAddressesRequest, *, timeout: float | None = None
    ) -> nodes_pb.AddAddressesResponse:
        """Addresses the worker attached in the cloud."""
        return await self._call(self._nodes.AddAddresses, request, timeout)

    async def set_interfaces(
        self, request: nodes_pb.SetInterfacesRequest, *, timeout: float | None = None
    ) -> nodes_pb.SetInterfacesResponse:
        """The node's interfaces as the cloud holds them."""
        return await self._call(self._nodes.SetInterfaces, request, timeout)

    async def set_node_error(
        self, node: str, error: str, *, timeout: float | None = None
    ) -> nodes_pb.SetNodeErrorResponse:
        """The last error met maintaining the node ("" clears it)."""
        return await self._call(
            self._nodes.SetNodeError, nodes_pb.SetNodeErrorRequest(node=node, error=error), timeout
        )

    async def reserve_for_release(
        self, request: nodes_pb.ReserveForReleaseRequest, *, timeout: float | None = None
    ) -> nodes_pb.ReserveForReleaseResponse:
        """Reserve free addresses so they are no longer handed out (release handshake, step 1)."""
        return await self._call(self._nodes.ReserveForRelease, request, timeout)

    async def complete_release(
        self, request: nodes_pb.CompleteReleaseRequest, *, timeout: float | None = None
    ) -> nodes_pb.CompleteReleaseResponse:
        """The reserved addresses were unassigned in the cloud: they leave the pool."""
        return await self._call(self._nodes.CompleteRelease, request, timeout)

    async def abort_release(
        self, request: nodes_pb.AbortReleaseRequest, *, timeout: float | None = None
    ) -> nodes_pb.AbortReleaseResponse:
        """Give reserved addresses back to the pool."""
        return await self._call(self._nodes.AbortRelease, request, timeout)

    async def remove_addresses(
        self, request: nodes_pb.RemoveAddressesRequest, *, timeout: float | None = None
    ) -> nodes_pb.RemoveAddressesResponse:
        """Addresses found gone from the cloud leave the pool (allocated ones are kept)."""
        return await self._call(self._nodes.RemoveAddresses, request, timeout)


def _merge_pages(nodes: Iterable[nodes_pb.Node], order_by_watermark: bool) -> list[nodes_pb.Node]:
    """One of each node (the last seen: a node can move between pages of the watermark order while
    they are read), in the order asked for."""
    by_name = {n.spec.name: n for n in nodes}
    if not order_by_watermark:
        return [by_name[name] for name in sorted(by_name)]
    return sorted(by_name.values(), key=lambda n: (-n.stats.needed_ips, -n.stats.excess_ips, n.spec.name))
