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

A Redis failover answers both for a few seconds (UNAVAILABLE STORE_UNAVAILABLE until the new master is
found, OUTCOME_UNKNOWN until a replica holds its writes): keyed calls keep asking for
`failover_retry_seconds` (default 10 s), within their deadline.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import allocator_pb2_grpc, nodes_pb2_grpc
from ipam.v1 import nodes_pb2 as nodes_pb
from services.core.family import Family
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
# How long a keyed call keeps retrying the answers of a Redis failover. Sentinel with
# down-after-milliseconds 5000, or Redis Cluster with cluster-node-timeout 5000, has a new master
# taking writes 6-7 s after the old one died; the default deadline (10 s) bounds it anyway.
DEFAULT_FAILOVER_RETRY_S = 10.0
# What a failover answers; a keyed call may ask again (its key makes the retry take nothing twice).
_FAILOVER_REASONS = frozenset({ErrorReason.OUTCOME_UNKNOWN, ErrorReason.STORE_UNAVAILABLE})
_MAX_RETRY_DELAY_S = 1.0
SERVICES = ("ipam.v1.Allocator", "ipam.v1.NodeManager")
# Schemes of gRPC's built-in name resolvers; a target starting with one is used as given.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

_R = TypeVar("_R")
_P = ParamSpec("_P")
_F = TypeVar("_F", bound=Callable[..., Any])


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
    prefix_delegation: bool | None = None,
) -> nodes_pb.NodeSpec:
    """A `NodeSpec`. `pre_allocate=None` keeps the server's default (8); any number, 0 included, is
    explicit. `prefix_delegation=None` leaves it to the worker's default."""
    spec = nodes_pb.NodeSpec(
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
    if prefix_delegation is not None:
        spec.prefix_delegation = prefix_delegation
    return spec


def _key_of(idempotency_key: str) -> str:
    """The caller's key, else a fresh one for this logical call (shared by all its tries)."""
    return idempotency_key or f"ipam-client-{uuid.uuid4().hex}"


def _retry_delay(error: IpamClientError, attempt: int, retry_until: float, deadline: float | None) -> float | None:
    """How long to wait before retrying a keyed call that failed with `error` on try `attempt`
    (1-based); None to give up (another failure, or no retry may start by `retry_until` or end
    before `deadline`, both monotonic)."""
    if error.reason not in _FAILOVER_REASONS:
        return None
    delay = min(0.1 * 2 ** (attempt - 1), _MAX_RETRY_DELAY_S)
    now = time.monotonic()
    if now + delay > retry_until or (deadline is not None and now + delay >= deadline):
        return None
    return delay


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


@dataclass(frozen=True, slots=True)
class _Request(Generic[_R]):
    """One call as both clients make it: the stub's method, the request message, what of the answer
    the caller gets, and whether the request carries an idempotency key (then OUTCOME_UNKNOWN is retried)."""

    method: str  # e.g. "Allocator/AllocateNext"
    message: Any
    result: Callable[[Any], _R]
    timeout: float | None = None
    keyed: bool = False


def _answer(response: _R) -> _R:
    return response


def _nothing(response: Any) -> None:
    return None


class _Build:
    """Each call's request, built once: `IpamClient` sends them blocking, `AsyncIpamClient` awaits them
    (as httpx's `BaseClient.build_request`). Every function here is a public method of both clients."""

    # -- Allocator ---------------------------------------------------------------------------------

    @staticmethod
    def allocate_next(
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
    ) -> _Request[pb.AllocateNextResponse]:
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
        return _Request("Allocator/AllocateNext", request, _answer, timeout, keyed=True)

    @staticmethod
    def allocate(
        node: str,
        ip: str,
        owner: str,
        pool: str = "",
        *,
        skip_sync_upstream: bool = False,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> _Request[pb.AllocationResult]:
        """Allocate one specific address (a retry with the same `idempotency_key` gets the same result)."""
        request = pb.AllocateRequest(
            node=node,
            pool=pool,
            ip=ip,
            owner=owner,
            skip_sync_upstream=skip_sync_upstream,
            idempotency_key=_key_of(idempotency_key),
        )
        return _Request("Allocator/Allocate", request, lambda r: r.result, timeout, keyed=True)

    @staticmethod
    def release(
        node: str,
        pool: str = "",
        ip: str | None = None,
        owner: str | None = None,
        *,
        skip_sync_upstream: bool = False,
        timeout: float | None = None,
    ) -> _Request[list[str]]:
        """Release one address (`ip`) or every address of an `owner`; returns the released addresses."""
        if (ip is None) == (owner is None):
            raise ValueError("release takes exactly one of ip or owner")
        target = {"ip": ip} if ip is not None else {"owner": owner}
        request = pb.ReleaseRequest(node=node, pool=pool, skip_sync_upstream=skip_sync_upstream, **target)
        return _Request("Allocator/Release", request, lambda r: list(r.released_ips), timeout)

    @staticmethod
    def exclude_ip(node: str, ip: str, owner: str, pool: str = "", *, timeout: float | None = None) -> _Request[None]:
        """Take an address out of circulation."""
        request = pb.ExcludeIPRequest(node=node, pool=pool, ip=ip, owner=owner)
        return _Request("Allocator/ExcludeIP", request, _nothing, timeout)

    @staticmethod
    def start_expiration_timer(
        node: str, ip: str, timeout_seconds: int, pool: str = "", *, timeout: float | None = None
    ) -> _Request[str]:
        """(Re)start the expiration timer of an allocated address; returns the timer's uuid."""
        request = pb.StartExpirationTimerRequest(node=node, pool=pool, ip=ip, timeout_seconds=timeout_seconds)
        return _Request("Allocator/StartExpirationTimer", request, lambda r: r.expiration_uuid, timeout)

    @staticmethod
    def stop_expiration_timer(
        node: str, ip: str, expiration_uuid: str, pool: str = "", *, timeout: float | None = None
    ) -> _Request[None]:
        """Stop a timer; `expiration_uuid` must be the running timer's."""
        request = pb.StopExpirationTimerRequest(node=node, pool=pool, ip=ip, expiration_uuid=expiration_uuid)
        return _Request("Allocator/StopExpirationTimer", request, _nothing, timeout)

    @staticmethod
    def dump(node: str, pool: str = "", *, timeout: float | None = None) -> _Request[pb.DumpResponse]:
        """Every allocated address of the pool (`ipv4` / `ipv6`: ip → owner) and a status line."""
        return _Request("Allocator/Dump", pb.DumpRequest(node=node, pool=pool), _answer, timeout)

    @staticmethod
    def debug_status(*, timeout: float | None = None) -> _Request[str]:
        """A human-readable summary of the allocator's state."""
        return _Request("Allocator/DebugStatus", pb.DebugStatusRequest(), lambda r: r.status, timeout)

    @staticmethod
    def redis_status(*, timeout: float | None = None) -> _Request[pb.RedisStatus]:
        """Where the allocator writes (mode, master) and how many replicas hold its writes."""
        return _Request("Allocator/DebugStatus", pb.DebugStatusRequest(), lambda r: r.redis, timeout)

    @staticmethod
    def get_vpc_cidrs(node: str, *, timeout: float | None = None) -> _Request[list[str]]:
        """The VPC CIDRs the worker reported for the node."""
        return _Request("Allocator/GetVpcCIDRs", pb.GetVpcCIDRsRequest(node=node), lambda r: list(r.cidrs), timeout)

    @staticmethod
    def ping(*, timeout: float | None = None) -> _Request[None]:
        """A call that does nothing; raises if the allocator cannot be reached."""
        return _Request("Allocator/Ping", pb.PingRequest(), _nothing, timeout)

    # -- NodeManager (admin) -----------------------------------------------------------------------

    @staticmethod
    def create_node(spec: nodes_pb.NodeSpec, *, timeout: float | None = None) -> _Request[nodes_pb.Node]:
        """Register a node (build the spec with `node_spec`)."""
        return _Request("NodeManager/CreateNode", nodes_pb.CreateNodeRequest(spec=spec), _answer, timeout)

    @staticmethod
    def update_node(spec: nodes_pb.NodeSpec, *, timeout: float | None = None) -> _Request[nodes_pb.Node]:
        """Replace a node's spec."""
        return _Request("NodeManager/UpdateNode", nodes_pb.UpdateNodeRequest(spec=spec), _answer, timeout)

    @staticmethod
    def delete_node(name: str, *, timeout: float | None = None) -> _Request[None]:
        """Forget a node and its pools."""
        return _Request("NodeManager/DeleteNode", nodes_pb.DeleteNodeRequest(name=name), _nothing, timeout)

    @staticmethod
    def get_node(name: str, pool: str = "", *, timeout: float | None = None) -> _Request[nodes_pb.Node]:
        """A node with its spec, interfaces and the stats of `pool`."""
        return _Request("NodeManager/GetNode", nodes_pb.GetNodeRequest(name=name, pool=pool), _answer, timeout)

    @staticmethod
    def list_nodes_page(
        order_by_watermark: bool, page_size: int, page_token: str, timeout: float | None
    ) -> _Request[nodes_pb.ListNodesResponse]:
        """One page of ListNodes (the clients' `iter_nodes` follows the pages)."""
        request = nodes_pb.ListNodesRequest(
            order_by_watermark=order_by_watermark, page_size=page_size, page_token=page_token
        )
        return _Request("NodeManager/ListNodes", request, _answer, timeout)

    @staticmethod
    def resync(*, timeout: float | None = None) -> _Request[nodes_pb.ResyncResponse]:
        """Recompute every node and publish an event for each one whose pool needs work."""
        return _Request("NodeManager/Resync", nodes_pb.ResyncRequest(), _answer, timeout)

    # -- NodeManager, worker-facing (admin) --------------------------------------------------------

    @staticmethod
    def list_dead_events(limit: int = 0, *, timeout: float | None = None) -> _Request[nodes_pb.ListDeadEventsResponse]:
        """Dead-lettered events (newest first), with the stream's pending count and its consumers."""
        return _Request("NodeManager/ListDeadEvents", nodes_pb.ListDeadEventsRequest(limit=limit), _answer, timeout)

    @staticmethod
    def replay_dead_events(
        ids: Sequence[str] = (), *, all: bool = False, timeout: float | None = None
    ) -> _Request[nodes_pb.ReplayDeadEventsResponse]:
        """Puts dead-lettered events back on the stream (these ids, or `all=True`)."""
        request = nodes_pb.ReplayDeadEventsRequest(ids=list(ids), all=all)
        return _Request("NodeManager/ReplayDeadEvents", request, _answer, timeout)

    @staticmethod
    def add_addresses(
        request: nodes_pb.AddAddressesRequest, *, timeout: float | None = None
    ) -> _Request[nodes_pb.AddAddressesResponse]:
        """Addresses the worker attached in the cloud."""
        return _Request("NodeManager/AddAddresses", request, _answer, timeout)

    @staticmethod
    def set_interfaces(
        request: nodes_pb.SetInterfacesRequest, *, timeout: float | None = None
    ) -> _Request[nodes_pb.SetInterfacesResponse]:
        """The node's interfaces as the cloud holds them."""
        return _Request("NodeManager/SetInterfaces", request, _answer, timeout)

    @staticmethod
    def set_node_error(
        node: str, error: str, *, timeout: float | None = None
    ) -> _Request[nodes_pb.SetNodeErrorResponse]:
        """The last error met maintaining the node ("" clears it)."""
        request = nodes_pb.SetNodeErrorRequest(node=node, error=error)
        return _Request("NodeManager/SetNodeError", request, _answer, timeout)

    @staticmethod
    def reserve_for_release(
        request: nodes_pb.ReserveForReleaseRequest, *, timeout: float | None = None
    ) -> _Request[nodes_pb.ReserveForReleaseResponse]:
        """Reserve free addresses so they are no longer handed out (release handshake, step 1)."""
        return _Request("NodeManager/ReserveForRelease", request, _answer, timeout)

    @staticmethod
    def complete_release(
        request: nodes_pb.CompleteReleaseRequest, *, timeout: float | None = None
    ) -> _Request[nodes_pb.CompleteReleaseResponse]:
        """The reserved addresses were unassigned in the cloud: they leave the pool."""
        return _Request("NodeManager/CompleteRelease", request, _answer, timeout)

    @staticmethod
    def abort_release(
        request: nodes_pb.AbortReleaseRequest, *, timeout: float | None = None
    ) -> _Request[nodes_pb.AbortReleaseResponse]:
        """Give reserved addresses back to the pool."""
        return _Request("NodeManager/AbortRelease", request, _answer, timeout)

    @staticmethod
    def remove_addresses(
        request: nodes_pb.RemoveAddressesRequest, *, timeout: float | None = None
    ) -> _Request[nodes_pb.RemoveAddressesResponse]:
        """Addresses found gone from the cloud leave the pool (allocated ones are kept)."""
        return _Request("NodeManager/RemoveAddresses", request, _answer, timeout)


def _blocking(build: Callable[_P, _Request[_R]]) -> Callable[Concatenate[IpamClient, _P], _R]:
    """`build`'s call as a method of `IpamClient`: its arguments, its docstring, the answer."""

    @functools.wraps(build)
    def method(self: IpamClient, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self._send(build(*args, **kwargs))

    return _as_method(method, build)


def _awaitable(build: Callable[_P, _Request[_R]]) -> Callable[Concatenate[AsyncIpamClient, _P], Awaitable[_R]]:
    """`build`'s call as a coroutine method of `AsyncIpamClient`."""

    @functools.wraps(build)
    async def method(self: AsyncIpamClient, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await self._send(build(*args, **kwargs))

    return _as_method(method, build)


def _as_method(method: _F, build: Callable[..., Any]) -> _F:
    """`help()` and `inspect.signature` show `build`'s parameters after `self`, without its `_Request`."""
    signature = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[this, *signature.parameters.values()], return_annotation=inspect.Signature.empty
    )
    return method


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
        failover_retry_seconds: float = DEFAULT_FAILOVER_RETRY_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`address`: "host:port" or a comma-separated list of replicas (see `parse_target`).
        `token`: sent as `authorization: Bearer <token>` on every call. `timeout`: the default
        deadline of a call in seconds (None = none). TLS is on when `tls` is true or any TLS file is
        given: `tls_ca` = root certificates (default: the system's), `tls_cert` + `tls_key` = a client
        certificate for mutual TLS. `max_attempts`: tries per call when the server is UNAVAILABLE (below 2:
        no retries at all). `failover_retry_seconds`: how long `allocate_next` and `allocate` keep retrying
        OUTCOME_UNKNOWN and STORE_UNAVAILABLE (a Redis failover), within the call's deadline.
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
        self.failover_retry_seconds = failover_retry_seconds if max_attempts >= 2 else 0.0
        self._options = [*channel_options(max_attempts, tls_server_name), *options]
        self.channel = self._connect()
        self._stubs = {
            "Allocator": allocator_pb2_grpc.AllocatorStub(self.channel),
            "NodeManager": nodes_pb2_grpc.NodeManagerStub(self.channel),
        }

    def _connect(self) -> Any:
        """Open the channel: blocking in `IpamClient`, grpc.aio in `AsyncIpamClient`."""
        raise NotImplementedError

    def _rpc(self, request: _Request[Any]) -> Any:
        service, _, method = request.method.partition("/")
        return getattr(self._stubs[service], method)

    def _deadline(self, timeout: float | None) -> float | None:
        """The monotonic end of a logical call (all its tries)."""
        effective = self.timeout if timeout is None else timeout
        return None if effective is None else time.monotonic() + effective

    def _try_options(self, request: _Request[Any], deadline: float | None) -> dict[str, Any]:
        """Deadline and metadata of one try: a keyed call's tries share the call's deadline."""
        timeout = self.timeout if request.timeout is None else request.timeout
        if request.keyed and deadline is not None:
            timeout = max(deadline - time.monotonic(), 0.001)
        return {"timeout": timeout, "metadata": self._metadata}

    def _failed(
        self, rpc_error: grpc.RpcError, request: _Request[Any], attempt: int, started: float, deadline: float | None
    ) -> tuple[IpamClientError, float | None]:
        """The error of a failed try, and how long to wait before the next one (None: no retry)."""
        error = IpamClientError.from_rpc_error(rpc_error)
        retry_until = started + self.failover_retry_seconds
        delay = _retry_delay(error, attempt, retry_until, deadline) if request.keyed else None
        return error, delay


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

    def _send(self, request: _Request[_R]) -> _R:
        """Makes the call; a keyed one is retried on OUTCOME_UNKNOWN within its deadline."""
        rpc, deadline, attempt = self._rpc(request), self._deadline(request.timeout), 0
        started = time.monotonic()
        while True:
            attempt += 1
            try:
                return request.result(rpc(request.message, **self._try_options(request, deadline)))
            except grpc.RpcError as rpc_error:
                error, delay = self._failed(rpc_error, request, attempt, started, deadline)
                if delay is None:
                    raise error from rpc_error
            time.sleep(delay)

    allocate_next = _blocking(_Build.allocate_next)
    allocate = _blocking(_Build.allocate)
    release = _blocking(_Build.release)
    exclude_ip = _blocking(_Build.exclude_ip)
    start_expiration_timer = _blocking(_Build.start_expiration_timer)
    stop_expiration_timer = _blocking(_Build.stop_expiration_timer)
    dump = _blocking(_Build.dump)
    debug_status = _blocking(_Build.debug_status)
    redis_status = _blocking(_Build.redis_status)
    get_vpc_cidrs = _blocking(_Build.get_vpc_cidrs)
    ping = _blocking(_Build.ping)
    create_node = _blocking(_Build.create_node)
    update_node = _blocking(_Build.update_node)
    delete_node = _blocking(_Build.delete_node)
    get_node = _blocking(_Build.get_node)
    resync = _blocking(_Build.resync)
    list_dead_events = _blocking(_Build.list_dead_events)
    replay_dead_events = _blocking(_Build.replay_dead_events)
    add_addresses = _blocking(_Build.add_addresses)
    set_interfaces = _blocking(_Build.set_interfaces)
    set_node_error = _blocking(_Build.set_node_error)
    reserve_for_release = _blocking(_Build.reserve_for_release)
    complete_release = _blocking(_Build.complete_release)
    abort_release = _blocking(_Build.abort_release)
    remove_addresses = _blocking(_Build.remove_addresses)

    def iter_nodes(
        self, order_by_watermark: bool = False, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[nodes_pb.Node]:
        """Every node, a page (ListNodes call, `timeout` each) at a time; by name, or with
        `order_by_watermark` biggest deficit first within each page."""
        token = ""
        while True:
            reply = self._send(_Build.list_nodes_page(order_by_watermark, page_size, token, timeout))
            yield from reply.nodes
            token = reply.next_page_token
            if not token:
                return

    def list_nodes(self, order_by_watermark: bool = False, *, timeout: float | None = None) -> list[nodes_pb.Node]:
        """Every node (following the pages); with `order_by_watermark`, biggest deficit first."""
        return _merge_pages(self.iter_nodes(order_by_watermark, timeout=timeout), order_by_watermark)


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

    async def _send(self, request: _Request[_R]) -> _R:
        """See `IpamClient._send`."""
        rpc, deadline, attempt = self._rpc(request), self._deadline(request.timeout), 0
        started = time.monotonic()
        while True:
            attempt += 1
            try:
                return request.result(await rpc(request.message, **self._try_options(request, deadline)))
            except grpc.RpcError as rpc_error:
                error, delay = self._failed(rpc_error, request, attempt, started, deadline)
                if delay is None:
                    raise error from rpc_error
            await asyncio.sleep(delay)

    allocate_next = _awaitable(_Build.allocate_next)
    allocate = _awaitable(_Build.allocate)
    release = _awaitable(_Build.release)
    exclude_ip = _awaitable(_Build.exclude_ip)
    start_expiration_timer = _awaitable(_Build.start_expiration_timer)
    stop_expiration_timer = _awaitable(_Build.stop_expiration_timer)
    dump = _awaitable(_Build.dump)
    debug_status = _awaitable(_Build.debug_status)
    redis_status = _awaitable(_Build.redis_status)
    get_vpc_cidrs = _awaitable(_Build.get_vpc_cidrs)
    ping = _awaitable(_Build.ping)
    create_node = _awaitable(_Build.create_node)
    update_node = _awaitable(_Build.update_node)
    delete_node = _awaitable(_Build.delete_node)
    get_node = _awaitable(_Build.get_node)
    resync = _awaitable(_Build.resync)
    list_dead_events = _awaitable(_Build.list_dead_events)
    replay_dead_events = _awaitable(_Build.replay_dead_events)
    add_addresses = _awaitable(_Build.add_addresses)
    set_interfaces = _awaitable(_Build.set_interfaces)
    set_node_error = _awaitable(_Build.set_node_error)
    reserve_for_release = _awaitable(_Build.reserve_for_release)
    complete_release = _awaitable(_Build.complete_release)
    abort_release = _awaitable(_Build.abort_release)
    remove_addresses = _awaitable(_Build.remove_addresses)

    async def iter_nodes(
        self, order_by_watermark: bool = False, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[nodes_pb.Node]:
        """See `IpamClient.iter_nodes`."""
        token = ""
        while True:
            reply = await self._send(_Build.list_nodes_page(order_by_watermark, page_size, token, timeout))
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


def _merge_pages(nodes: Iterable[nodes_pb.Node], order_by_watermark: bool) -> list[nodes_pb.Node]:
    """One of each node (the last seen: a node can move between pages of the watermark order while
    they are read), in the order asked for."""
    by_name = {n.spec.name: n for n in nodes}
    if not order_by_watermark:
        return [by_name[name] for name in sorted(by_name)]
    return sorted(by_name.values(), key=lambda n: (-n.stats.needed_ips, -n.stats.excess_ips, n.spec.name))
