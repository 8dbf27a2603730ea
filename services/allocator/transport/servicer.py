"""gRPC servicers: a thin translation between protobuf and the AllocatorService."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import Any, TypeVar

import grpc

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import allocator_pb2_grpc, events_pb2, nodes_pb2_grpc
from ipam.v1 import nodes_pb2 as npb
from services.core.family import Family
from services.core.pool_math import DEFAULT_PRE_ALLOCATE, Watermarks
from services.core.reasons import ErrorReason

from ..domain.errors import InvalidArgument, IpAlreadyAllocated, IpamError, Unavailable
from ..domain.model import Allocation, parse_family, validate_page_size
from ..domain.pool import CloudFacts, NodeInterface, NodeSettings, PoolEvent, PrefixUse
from ..metrics import AllocatorMetrics
from ..service import AllocatorService, NodeView
from ..store.base import CallScope, current_call_scope
from .cutoffs import Cutoffs
from .status import status_code_of, to_status

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]

# Keep a little of the caller's deadline to send our own answer (UNAVAILABLE, not DEADLINE_EXCEEDED).
_DEADLINE_MARGIN = 0.05
_LEAST_KEPT = 2 * _DEADLINE_MARGIN  # of a waiting call's time, for its answer (`_deadline`)


def rpc(handler: Handler) -> Handler:
    """Runs a handler within the call's deadline and turns domain errors into statuses (the
    servicer has `metrics` and `cutoffs`)."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"  # the status code's name (StatusCode.name is an enum property: slow)
        metrics = self.metrics.method(method) if self.metrics is not None else None
        if metrics is not None:
            metrics.start()
        try:
            remaining = context.time_remaining()
            try:
                # The store ends its own waits earlier (`_deadline`), saying whether a change may apply.
                with (
                    CallScope(_deadline(remaining)),
                    self.cutoffs.after(None if remaining is None else max(remaining - _DEADLINE_MARGIN, 0.001)),
                ):
                    return await handler(self, request, context)
            except TimeoutError:
                raise Unavailable(
                    "the store did not answer within the call's deadline", reason=ErrorReason.DEADLINE_TOO_SHORT
                ) from None
        except IpamError as error:
            code = status_code_of(error).name
            await context.abort_with_status(to_status(error))
        finally:
            if metrics is not None:
                metrics.done(code, time.perf_counter() - started)

    return wrapper


def _deadline(remaining: float | None) -> float | None:
    """When a waiting call stops waiting, given the seconds left before its deadline: a tenth of its
    time before (0.1 s to 1 s), so that its answer still arrives when many waiting calls end at once
    on a busy server."""
    if remaining is None:
        return None
    keep = 0.1 * remaining  # bounded by comparisons: min(max()) costs twice as much
    if keep < _LEAST_KEPT:
        keep = _LEAST_KEPT
    elif keep > 1.0:
        keep = 1.0
    return time.monotonic() + remaining - keep


def _call_deadline() -> float | None:
    """This call's `_deadline`, as `rpc` set it for the store."""
    scope = current_call_scope()
    return None if scope is None else scope.deadline


def allocation_result(a: Allocation) -> pb.AllocationResult:
    return fill_allocation_result(pb.AllocationResult(), a)


def fill_allocation_result(result: pb.AllocationResult, a: Allocation) -> pb.AllocationResult:
    """Sets `a` into `result`, e.g. a field of a response: a third cheaper than building the message
    and copying it there."""
    result.ip = a.ip
    result.cidrs.extend(a.vpc_cidrs)
    result.primary_mac = a.mac
    result.gateway_ip = a.gateway_ip
    result.expiration_uuid = a.expiration_uuid
    result.interface_number = str(a.device_index)
    result.interface_id = a.interface_id
    result.pool = a.pool
    result.owner = a.owner
    result.subnet_cidr = a.subnet_cidr
    return result


class AllocatorServicer(allocator_pb2_grpc.AllocatorServicer):
    def __init__(
        self,
        service: AllocatorService,
        metrics: AllocatorMetrics | None,
        is_admin: Callable[[Any], bool] | None = None,
    ) -> None:
        """`is_admin(metadata)`: whether a caller may be told who holds an address (default: everyone)."""
        self.service = service
        self.metrics = metrics
        self.is_admin = is_admin or (lambda metadata: True)
        self.cutoffs = Cutoffs()

    @rpc
    async def AllocateNext(
        self, request: pb.AllocateNextRequest, context: grpc.aio.ServicerContext
    ) -> pb.AllocateNextResponse:
        allocations = await self.service.allocate_next(
            request.node,
            request.pool,
            parse_family(request.family),
            request.owner,
            expiration_seconds=request.expiration_seconds,
            skip_sync_upstream=request.skip_sync_upstream,
            idempotency_key=request.idempotency_key,
            wait_for_refill=request.wait_for_refill,
            deadline=_call_deadline(),
        )
        response = pb.AllocateNextResponse()
        for a in allocations:
            fill_allocation_result(response.ipv4 if a.family is Family.IPV4 else response.ipv6, a)
        return response

    @rpc
    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        try:
            a = await self.service.allocate(
                request.node,
                request.pool,
                request.ip,
                request.owner,
                skip_sync_upstream=request.skip_sync_upstream,
                idempotency_key=request.idempotency_key,
            )
        except IpAlreadyAllocated as error:
            holder = error.current_owner
            if holder and self.is_admin(context.invocation_metadata()):
                # Who holds an address is for operators, not for every client of the node.
                error.message = f"{error.message} by owner {holder!r}"
                error.metadata["owner"] = holder
            raise
        return pb.AllocateResponse(result=allocation_result(a))

    @rpc
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        target = request.WhichOneof("target")
        released = await self.service.release(
            request.node,
            request.pool,
            ip=request.ip if target == "ip" else None,
            owner=request.owner if target == "owner" else None,
            skip_sync_upstream=request.skip_sync_upstream,
        )
        return pb.ReleaseResponse(released_ips=released)

    @rpc
    async def ReleaseByKey(
        self, request: pb.ReleaseByKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        released = await self.service.release_by_key(
            request.node, request.pool, request.idempotency_key, skip_sync_upstream=request.skip_sync_upstream
        )
        return pb.ReleaseResponse(released_ips=released)

    @rpc
    async def ListAllocations(
        self, request: pb.ListAllocationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAllocationsResponse:
        found = await self.service.keyed_allocations(request.node, request.pool, request.key_prefix)
        return pb.ListAllocationsResponse(
            allocations=[
                pb.KeyedAllocation(ip=a.ip, family=int(a.family), owner=a.owner, idempotency_key=a.idempotency_key)
                for a in found
            ]
        )

    @rpc
    async def ExcludeIP(self, request: pb.ExcludeIPRequest, context: grpc.aio.ServicerContext) -> pb.ExcludeIPResponse:
        await self.service.exclude(request.node, request.pool, request.ip, request.owner)
        return pb.ExcludeIPResponse()

    @rpc
    async def StartExpirationTimer(
        self, request: pb.StartExpirationTimerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartExpirationTimerResponse:
        uuid = await self.service.start_timer(request.node, request.pool, request.ip, request.timeout_seconds)
        return pb.StartExpirationTimerResponse(expiration_uuid=uuid)

    @rpc
    async def StopExpirationTimer(
        self, request: pb.StopExpirationTimerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopExpirationTimerResponse:
        await self.service.stop_timer(request.node, request.pool, request.ip, request.expiration_uuid)
        return pb.StopExpirationTimerResponse()

    @rpc
    async def Dump(self, request: pb.DumpRequest, context: grpc.aio.ServicerContext) -> pb.DumpResponse:
        d = await self.service.dump(request.node, request.pool)
        return pb.DumpResponse(
            ipv4=d.ipv4,
            ipv6=d.ipv6,
            free_ipv4=d.free_ipv4,
            free_ipv6=d.free_ipv6,
            status=f"{len(d.ipv4)} IPv4 and {len(d.ipv6)} IPv6 addresses allocated, "
            f"{len(d.free_ipv4)} IPv4 and {len(d.free_ipv6)} IPv6 free",
            subnets=[
                pb.PoolSubnet(family=int(s.family), cidr=s.cidr, gateway_ip=s.gateway_ip, interface_ids=s.interface_ids)
                for s in d.subnets
            ],
            prefixes=[prefix_message(p) for p in d.prefixes],
            ipv6_prefix=d.ipv6_prefix,
        )

    @rpc
    async def DebugStatus(
        self, request: pb.DebugStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.DebugStatusResponse:
        status, redis = await asyncio.gather(self.service.debug_status(), self.service.replication())
        return pb.DebugStatusResponse(
            status=status,
            redis=pb.RedisStatus(
                mode=redis.mode,
                master=redis.master,
                masters=redis.masters,
                replicas=redis.replicas,
                replicas_in_sync=redis.replicas_in_sync,
                min_replicas=redis.min_replicas,
            ),
        )

    @rpc
    async def GetVpcCIDRs(
        self, request: pb.GetVpcCIDRsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVpcCIDRsResponse:
        return pb.GetVpcCIDRsResponse(cidrs=await self.service.vpc_cidrs(request.node))

    async def Ping(self, request: pb.PingRequest, context: grpc.aio.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse()


_INTERFACE_FIELDS = tuple(f.name for f in fields(NodeInterface))  # the same names as npb.Interface's


def node_interface(message: npb.Interface) -> NodeInterface:
    """Field by field: json_format is slow on the worker's hot path."""
    return NodeInterface(**{name: _plain(getattr(message, name)) for name in _INTERFACE_FIELDS})


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int) else tuple(value)


def interface_message(interface: NodeInterface) -> npb.Interface:
    return npb.Interface(**{name: getattr(interface, name) for name in _INTERFACE_FIELDS})


def cloud_facts(request: npb.AddAddressesRequest | npb.SetInterfacesRequest) -> CloudFacts:
    return CloudFacts(tuple(request.vpc_cidrs), request.max_interfaces, request.ipv4_per_interface)


def event_message(event: PoolEvent) -> events_pb2.PoolEvent:
    return events_pb2.PoolEvent(
        node=event.node, pool=event.pool, kind=int(event.kind), published_at_ms=event.published_at_ms
    )


def node_settings(spec: npb.NodeSpec) -> NodeSettings:
    pre = spec.pre_allocate if (spec.pre_allocate_set or spec.pre_allocate) else DEFAULT_PRE_ALLOCATE
    return NodeSettings(
        watermarks=Watermarks(pre, spec.min_allocate, spec.max_allocate, spec.max_above_watermark),
        first_interface_index=spec.first_interface_index,
        release_excess=spec.release_excess,
        ipv6_enabled=spec.ipv6_enabled,
        spec_items=_spec_items(spec),
    )


def node_message(view: NodeView) -> npb.Node:
    r, s = view.record, view.stats
    now_ms = int(time.time() * 1000)
    spec = npb.NodeSpec.FromString(r.spec)
    if not spec.pre_allocate_set and not spec.pre_allocate:
        spec.pre_allocate = DEFAULT_PRE_ALLOCATE
    return npb.Node(
        spec=spec,
        interfaces=[interface_message(i) for i in r.interfaces],
        stats=npb.NodeStats(
            used_ips=s.used_ips,
            available_ips=s.available_ips,
            needed_ips=s.needed_ipv4,
            excess_ips=s.excess_ipv4,
            remaining_interfaces=s.remaining_interfaces,
            interface_candidates=s.interface_candidates,
            empty_interface_slots=s.empty_interface_slots,
            cooling_ips=s.cooling_ips,
            used_ipv6=s.used_ipv6,
            available_ipv6=s.available_ipv6,
            needed_ipv6=s.needed_ipv6,
            excess_ipv6=s.excess_ipv6,
            waiting_ipv4=s.waiting_ipv4,
            waiting_ipv6=s.waiting_ipv6,
            lost_ips=s.lost_ips,
            reserved_ips=s.reserved_ips,
            excluded_ips=s.excluded_ips,
            deficit_reason=r.deficit_reason,
            max_allocatable_ipv4=s.max_allocatable_ipv4,
            ipv4_prefixes=s.ipv4_prefixes,
        ),
        pools=r.pools,
        vpc_cidrs=r.vpc_cidrs,
        max_interfaces=r.max_interfaces,
        ipv4_per_interface=r.ipv4_per_interface,
        reservations=[
            npb.Reservation(id=v.id, ips=v.ips, age_ms=max(now_ms - (v.created_ms or now_ms), 0), prefix=v.prefix)
            for v in view.reservations
        ],
        last_error=r.last_error,
        last_error_ms=r.last_error_ms,
        prefixes=[prefix_message(p) for p in r.prefixes],
        ipv6_prefix=r.ipv6_prefix,
    )


def prefix_message(use: PrefixUse) -> pb.PrefixUse:
    return pb.PrefixUse(
        prefix=use.prefix,
        interface_id=use.interface_id,
        free=use.free,
        cooling=use.cooling,
        allocated=use.allocated,
        excluded=use.excluded,
        reserved=use.reserved,
    )


# Page tokens say which order they continue: by name, the last name given; by watermark, an offset.
_BY_NAME, _BY_WATERMARK = "name:", "watermark:"


def _page_token_value(token: str, kind: str) -> str:
    if not token:
        return ""
    if not token.startswith(kind):
        raise InvalidArgument("page_token is not one of ours (or of another order)", reason=ErrorReason.INVALID_PAGE)
    return token[len(kind) :]


def _spec_items(spec: npb.NodeSpec) -> dict[str, list[str]]:
    return {
        "subnet_ids": list(spec.subnet_ids),
        "subnet_tags": [f"{k}={v}" for k, v in spec.subnet_tags.items()],
        "security_group_ids": list(spec.security_group_ids),
        "security_group_tags": [f"{k}={v}" for k, v in spec.security_group_tags.items()],
    }


def _watermark_order(node: npb.Node) -> tuple[int, int, str]:
    # Biggest deficit first, then biggest excess (Cilium's GetNodesByIPWatermark).
    return (-node.stats.needed_ips, -node.stats.excess_ips, node.spec.name)


class NodeManagerServicer(nodes_pb2_grpc.NodeManagerServicer):
    def __init__(self, service: AllocatorService, metrics: AllocatorMetrics | None) -> None:
        self.service = service
        self.metrics = metrics
        self.cutoffs = Cutoffs()

    async def _put(self, spec: npb.NodeSpec, create: bool) -> npb.Node:
        view = await self.service.put_node(spec.name, spec.SerializeToString(), node_settings(spec), create=create)
        return node_message(view)

    @rpc
    async def CreateNode(self, request: npb.CreateNodeRequest, context: grpc.aio.ServicerContext) -> npb.Node:
        return await self._put(request.spec, True)

    @rpc
    async def UpdateNode(self, request: npb.UpdateNodeRequest, context: grpc.aio.ServicerContext) -> npb.Node:
        return await self._put(request.spec, False)

    @rpc
    async def DeleteNode(
        self, request: npb.DeleteNodeRequest, context: grpc.aio.ServicerContext
    ) -> npb.DeleteNodeResponse:
        await self.service.delete_node(request.name)
        return npb.DeleteNodeResponse()

    @rpc
    async def GetNode(self, request: npb.GetNodeRequest, context: grpc.aio.ServicerContext) -> npb.Node:
        return node_message(await self.service.node_view(request.name, request.pool))

    @rpc
    async def ListNodes(
        self, request: npb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> npb.ListNodesResponse:
        if request.order_by_watermark:
            return await self._nodes_by_watermark(request)
        after = _page_token_value(request.page_token, _BY_NAME)
        views, last = await self.service.node_page(request.page_size, after)
        nodes = [node_message(v) for v in views]
        return npb.ListNodesResponse(nodes=nodes, next_page_token=_BY_NAME + last if last else "")

    async def _nodes_by_watermark(self, request: npb.ListNodesRequest) -> npb.ListNodesResponse:
        # The order needs every node's figures: pages are slices of the order at each call, so a
        # node whose figures changed meanwhile may show on two pages or none (the client re-sorts
        # and keeps one of each; the worker's resync repairs what an order missed).
        size = validate_page_size(request.page_size)
        token = _page_token_value(request.page_token, _BY_WATERMARK)
        if token and not token.isdigit():
            raise InvalidArgument("page_token is not one of ours", reason=ErrorReason.INVALID_PAGE)
        start = int(token or 0)
        nodes = sorted((node_message(v) for v in await self.service.node_views()), key=_watermark_order)
        more = start + size < len(nodes)
        return npb.ListNodesResponse(
            nodes=nodes[start : start + size], next_page_token=f"{_BY_WATERMARK}{start + size}" if more else ""
        )

    @rpc
    async def Resync(self, request: npb.ResyncRequest, context: grpc.aio.ServicerContext) -> npb.ResyncResponse:
        nodes, published = await self.service.resync()
        return npb.ResyncResponse(nodes=nodes, events_published=published)

    @rpc
    async def ListDeadEvents(
        self, request: npb.ListDeadEventsRequest, context: grpc.aio.ServicerContext
    ) -> npb.ListDeadEventsResponse:
        letters = await self.service.dead_letters(request.limit)
        pending, total = await self.service.event_counts()
        return npb.ListDeadEventsResponse(
            events=[
                npb.DeadEvent(id=d.id, entry_id=d.entry_id, deliveries=d.deliveries, event=event_message(d.event))
                for d in letters
            ],
            total=total,
            pending=pending,
            consumers=[
                npb.EventConsumer(
                    name=c.name,
                    pending=c.pending,
                    idle_ms=c.idle_ms,
                    alive=c.alive,
                    heartbeat_expires_in_ms=c.heartbeat_ms,
                )
                for c in await self.service.event_consumers()
            ],
        )

    @rpc
    async def ReplayDeadEvents(
        self, request: npb.ReplayDeadEventsRequest, context: grpc.aio.ServicerContext
    ) -> npb.ReplayDeadEventsResponse:
        replayed, missing = await self.service.replay_dead_letters(list(request.ids), every=request.all)
        return npb.ReplayDeadEventsResponse(replayed=replayed, not_found=missing)

    @rpc
    async def AddAddresses(
        self, request: npb.AddAddressesRequest, context: grpc.aio.ServicerContext
    ) -> npb.AddAddressesResponse:
        added, view = await self.service.add_addresses(
            request.node,
            request.pool,
            node_interface(request.interface),
            list(request.ips),
            cloud_facts(request),
            fence=request.fencing_token,
            prefixes=list(request.ipv4_prefixes),
            ipv6_prefix=request.ipv6_prefix,
        )
        return npb.AddAddressesResponse(added_ips=added.ips, added_prefixes=added.prefixes, node=node_message(view))

    @rpc
    async def SetInterfaces(
        self, request: npb.SetInterfacesRequest, context: grpc.aio.ServicerContext
    ) -> npb.SetInterfacesResponse:
        await self.service.set_interfaces(
            request.node,
            [node_interface(i) for i in request.interfaces],
            cloud_facts(request),
            request.deficit_reason,
            fence=request.fencing_token,
        )
        return npb.SetInterfacesResponse()

    @rpc
    async def SetNodeError(
        self, request: npb.SetNodeErrorRequest, context: grpc.aio.ServicerContext
    ) -> npb.SetNodeErrorResponse:
        await self.service.set_node_error(request.node, request.error)
        return npb.SetNodeErrorResponse()

    @rpc
    async def ReserveForRelease(
        self, request: npb.ReserveForReleaseRequest, context: grpc.aio.ServicerContext
    ) -> npb.ReserveForReleaseResponse:
        rid, ips = await self.service.reserve_for_release(
            request.node,
            request.pool,
            parse_family(request.family),
            request.interface_id,
            request.count,
            fence=request.fencing_token,
            prefix=request.prefix,
        )
        return npb.ReserveForReleaseResponse(reservation_id=rid, ips=ips)

    @rpc
    async def CompleteRelease(
        self, request: npb.CompleteReleaseRequest, context: grpc.aio.ServicerContext
    ) -> npb.CompleteReleaseResponse:
        released = await self.service.complete_release(
            request.node, request.pool, request.reservation_id, list(request.ips), fence=request.fencing_token
        )
        return npb.CompleteReleaseResponse(released_ips=released)

    @rpc
    async def AbortRelease(
        self, request: npb.AbortReleaseRequest, context: grpc.aio.ServicerContext
    ) -> npb.AbortReleaseResponse:
        restored = await self.service.abort_release(
            request.node, request.pool, request.reservation_id, fence=request.fencing_token
        )
        return npb.AbortReleaseResponse(restored_ips=restored)

    @rpc
    async def RemoveAddresses(
        self, request: npb.RemoveAddressesRequest, context: grpc.aio.ServicerContext
    ) -> npb.RemoveAddressesResponse:
        outcome = await self.service.remove_addresses(
            request.node,
            request.pool,
            list(request.ips),
            fence=request.fencing_token,
            prefixes=list(request.ipv4_prefixes),
            ipv6_prefix=request.ipv6_prefix,
        )
        return npb.RemoveAddressesResponse(
            removed_ips=outcome.removed,
            still_allocated=outcome.still_allocated,
            newly_lost=outcome.newly_lost,
            removed_prefixes=outcome.removed_prefixes,
        )
