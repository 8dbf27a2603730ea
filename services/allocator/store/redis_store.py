"""The Redis store: every state change of a pool is one Lua script (a function of one library, run by FCALL).

This adapter turns script answers into domain values and Lua failure reasons into the domain's
exceptions; it knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import AskError, MovedError, ReadOnlyError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.family import Family
from services.core.pool_math import PoolCounts, Watermarks
from services.core.reasons import ErrorReason, pool_empty_reason
from services.core.redis_client import RedisClient, master_resolver

from ..domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    IpAlreadyAllocated,
    IpamError,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from ..domain.model import DEFAULT_POOL, Allocation
from ..domain.pool import (
    AllocateOutcome,
    ChangeOutcome,
    CloudFacts,
    KeyedAllocation,
    NodeInterface,
    NodeRecord,
    NodeSettings,
    PoolDump,
    PoolEmpty,
    PoolState,
    PoolSubnet,
    PrefixUse,
    RemoveOutcome,
    Replication,
    Reservation,
    prefix_uses,
)
from . import keys
from .base import CALL_KEY_PREFIX, current_call_scope
from .functions import is_function_missing, pool_library
from .pipelining import NotReplicatedError, OutcomeUnknownError, PipelinedConnection

T = TypeVar("T")

# Scripts that change nothing: their failures are plain "unavailable" whatever happened on the wire.
_READ_ONLY = frozenset({"pool_state"})

SCRIPTS = (
    "allocate_next",
    "allocate",
    "release",
    "exclude",
    "start_timer",
    "stop_timer",
    "expire",
    "add_addresses",
    "reserve_for_release",
    "complete_release",
    "abort_release",
    "remove_addresses",
    "set_interfaces",
    "put_node",
    "pool_state",
    "release_by_key",
    "cancel_call",
)

# The pool scripts as Redis loads them: one library of functions (functions.py).
POOL_LIBRARY = pool_library(SCRIPTS, _READ_ONLY)

# A Redis call ends this long before the caller's deadline, for the work after it.
DEADLINE_MARGIN_S = 0.01

# Why a pool is empty, by its error reason (the end of the message).
_POOL_EMPTY_WHY: dict[ErrorReason, str] = {
    ErrorReason.POOL_COOLING_DOWN: "its free addresses are still in the reuse cooldown",
    ErrorReason.NODE_AT_CAPACITY: "the node is at its instance's interface and address limits",
    ErrorReason.SUBNET_FULL: "its subnets have no free address",
    ErrorReason.INSTANCE_TYPE_UNKNOWN: "the cloud does not know the instance type of its spec",
    ErrorReason.INSTANCE_NOT_FOUND: "the cloud does not know the instance id of its spec",
    ErrorReason.NODE_HAS_NO_INSTANCE: "its spec names no instance id or type",
    ErrorReason.POOL_AT_MAX_ALLOCATE: "it holds max_allocate addresses; more come only when some are released",
    ErrorReason.POOL_EMPTY: "a refill has been requested",
}

_FAMILY_NAME = {Family.IPV4: "IPv4", Family.IPV6: "IPv6"}
_IPV4, _IPV6 = Family.IPV4, Family.IPV6

# Lua failure reason -> (domain exception, message template).
_FAILURES: dict[ErrorReason, tuple[type[IpamError], str]] = {
    ErrorReason.NODE_NOT_FOUND: (NotFound, "node {node} is not known"),
    ErrorReason.POOL_NOT_FOUND: (NotFound, "pool {pool} of node {node} does not exist"),
    ErrorReason.NODE_ALREADY_EXISTS: (AlreadyExists, "node {node} already exists"),
    ErrorReason.IP_ALREADY_ALLOCATED: (AlreadyExists, "{ip} is already allocated"),
    ErrorReason.IP_NOT_IN_POOL: (FailedPrecondition, "{ip} is not in pool {pool} of node {node}"),
    ErrorReason.IP_EXCLUDED: (FailedPrecondition, "{ip} is excluded from pool {pool} of node {node}"),
    ErrorReason.IP_RESERVED_FOR_RELEASE: (FailedPrecondition, "{ip} is being released to the cloud"),
    ErrorReason.IP_COOLING_DOWN: (FailedPrecondition, "{ip} was released within the reuse cooldown"),
    ErrorReason.IP_NOT_ALLOCATED: (NotFound, "{ip} is not allocated in pool {pool} of node {node}"),
    ErrorReason.OWNER_NOT_FOUND: (NotFound, "owner {owner!r} holds no address in pool {pool} of node {node}"),
    ErrorReason.IPV6_DISABLED: (FailedPrecondition, "IPv6 is not enabled on node {node}"),
    ErrorReason.NO_TIMER_RUNNING: (FailedPrecondition, "no expiration timer runs for {ip}"),
    ErrorReason.EXPIRATION_UUID_MISMATCH: (FailedPrecondition, "expiration uuid does not match the timer of {ip}"),
    ErrorReason.STALE_FENCING_TOKEN: (
        FailedPrecondition,
        "node {node} is maintained by another worker now (its fencing token is newer): nothing was changed",
    ),
    ErrorReason.RESERVATION_NOT_FOUND: (NotFound, "reservation is not known in pool {pool} of node {node}"),
    ErrorReason.PREFIX_OVERLAPS: (
        FailedPrecondition,
        "prefix {prefix} overlaps an address or another interface's prefix in pool {pool} of node {node}: "
        "nothing was added",
    ),
    ErrorReason.PREFIX_NOT_IN_POOL: (NotFound, "prefix {prefix} is not in pool {pool} of node {node}"),
    ErrorReason.IPV6_PREFIX_HELD: (
        FailedPrecondition,
        "pool {pool} of node {node} holds the IPv6 prefix {prefix} already (one a pool): nothing was added",
    ),
    ErrorReason.PREFIX_IN_USE: (
        FailedPrecondition,
        "prefix {prefix} has an address allocated, excluded or reserved ({ip}): only a wholly free prefix is "
        "released, nothing was reserved",
    ),
    ErrorReason.PREFIX_COOLING_DOWN: (
        FailedPrecondition,
        "prefix {prefix} has an address released within the reuse cooldown ({ip}): nothing was reserved",
    ),
    ErrorReason.CALL_CANCELLED: (Unavailable, "the call was given up while redis did not answer"),
    ErrorReason.IDEMPOTENCY_KEY_IN_USE: (
        FailedPrecondition,
        "the idempotency key already holds another owner's, family's or address's allocation in pool {pool} "
        "of node {node}; a key belongs to its first use until its addresses are released",
    ),
}


def _outcome_unknown(waited: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"redis did not answer within {waited} after the change was sent: it may have been applied, or be "
        "applied when redis answers; retry with the same idempotency key (or read back before acting again)",
        waited=waited,
    )


def _not_replicated(exc: NotReplicatedError, wanted: int) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"redis applied the change, but {exc.acks} of the {wanted} replicas asked for confirmed it in time: a "
        "failover could lose it; retry with the same idempotency key (or read back before acting again)",
        waited="replicas",
    )


def _as_list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return list(value) if isinstance(value, list) else []


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _pool_state(raw: dict[str, Any]) -> PoolState:
    counts = raw["counts"]
    pre, min_a, max_a, maw, rel, v6 = (_text(v) if v else "" for v in raw["wm"])
    return PoolState(
        counts={
            Family.IPV4: PoolCounts(*(int(x) for x in counts["4"])),
            Family.IPV6: PoolCounts(*(int(x) for x in counts["6"])),
        },
        watermarks=Watermarks(_int(pre, 8), _int(min_a), _int(max_a), _int(maw)),
        release_excess=rel == "1",
        ipv6_enabled=v6 == "1",
        event_pending=bool(raw["pending"]),
        waiting_ipv4=int(raw.get("waiting", 0)),
        waiting_ipv6=int(raw.get("waiting6", 0)),
        lost_ips=int(raw.get("lost", 0)),
        reserved=int(raw.get("reserved", 0)),
        excluded=int(raw.get("excluded", 0)),
        deficit_reason=_text(raw.get("reason") or ""),
        prefixes=int(raw.get("prefixes", 0)),
        stranded=int(raw.get("stranded", 0)),
        ipv6_prefix=bool(raw.get("prefix6", 0)),
    )


def _flat_state(values: Sequence[Any], start: int) -> PoolState:
    """A pool state from a flat answer, from `values[start]` on (lua/_lib.lua `append_state`): 22 values."""
    a4, u4, c4, a6, u6, c6, pre, min_a, max_a, maw, rel, v6, pending, waiting, waiting6, lost, reserved, excluded = (
        values[start : start + 18]
    )
    return PoolState(
        counts={Family.IPV4: PoolCounts(a4, u4, c4), Family.IPV6: PoolCounts(a6, u6, c6)},
        watermarks=Watermarks(_int(pre, 8), _int(min_a), _int(max_a), _int(maw)),
        release_excess=_text(rel) == "1",
        ipv6_enabled=_text(v6) == "1",
        event_pending=bool(pending),
        waiting_ipv4=waiting,
        waiting_ipv6=waiting6,
        lost_ips=lost,
        reserved=reserved,
        excluded=excluded,
        deficit_reason=_text(values[start + 18]),
        prefixes=values[start + 19],
        stranded=values[start + 20],
        ipv6_prefix=bool(values[start + 21]),
    )


# The families' tags as the scripts take them, for the usual requests.
_FAMILY_TAGS = {(Family.IPV4,): "4", (Family.IPV6,): "6", (Family.IPV6, Family.IPV4): "64"}


def _flat_allocation(values: Sequence[Any], i: int, pool: str, vpc_cidrs: tuple[str, ...]) -> Allocation:
    """The allocation at `values[i:i + 6]` of allocate_next's answer."""
    ip, tag, owner, expiration_uuid, iface, info = values[i : i + 6]
    family = _IPV4 if tag == b"4" else _IPV6
    mac, device_index, gateway, subnet = _interface_row(info.decode() if info else "", family)
    # By position, in Allocation's field order: keywords cost a third more, on every allocation.
    return Allocation(
        ip.decode(),
        family,
        pool,
        owner.decode(),
        iface.decode(),
        mac,
        device_index,
        gateway,
        subnet,
        expiration_uuid.decode(),
        vpc_cidrs,
    )


_INTERFACE_FIELDS = tuple(f.name for f in fields(NodeInterface))
_INTERFACE_LISTS = ("addresses", "security_group_ids", "ipv4_prefixes")


def _interface(raw: bytes) -> NodeInterface:
    info = json.loads(raw)
    for name in _INTERFACE_LISTS:
        info[name] = tuple(_as_list(info.get(name)))  # cjson writes an empty list as {}
    return NodeInterface(**{name: info[name] for name in _INTERFACE_FIELDS if name in info})


def interface_json(interface: NodeInterface) -> str:
    """An interface as its row in `keys.interfaces_key` (the scripts read and merge it)."""
    return json.dumps({name: getattr(interface, name) for name in _INTERFACE_FIELDS}, sort_keys=True)


_NO_FIELDS = ["", "", "", "", "", ""]


def _interface_row(info: str, family: Family) -> tuple[str, int, str, str]:
    """An interface's compact row (`interface_info`) as the MAC, the device index and `family`'s
    gateway and subnet. Rows written before the subnet was kept there have three fields, before
    IPv6's four: an IPv6 address then has no subnet or gateway, rather than the IPv4 ones."""
    row = info.split("\t")
    if len(row) < 6:
        row += _NO_FIELDS[len(row) :]
    mac, device_index, gateway, subnet, gateway6, subnet6 = row[:6]
    if family is _IPV6:
        gateway, subnet = gateway6, subnet6
    return mac, int(device_index or 0), gateway, subnet


def interface_info(interface: NodeInterface) -> str:
    """The compact form allocation results read (see `keys.interface_info_key`)."""
    i = interface
    return f"{i.mac}\t{i.device_index}\t{i.gateway_ip}\t{i.subnet_cidr}\t{i.gateway_ipv6}\t{i.subnet_ipv6_cidr}"


def _reservation(reservation_id: Any, raw: bytes) -> Reservation:
    value = json.loads(raw)
    return Reservation(
        _text(reservation_id), tuple(_as_list(value.get("ips"))), _int(value.get("ms")), _text(value.get("prefix"))
    )


def _pool_subnets(interfaces4: set[str], interfaces6: set[str], info: dict[Any, Any]) -> tuple[PoolSubnet, ...]:
    """Each family's subnets (with gateway) of the interfaces holding a pool's addresses of that family."""
    rows = {_text(k): _text(v) for k, v in info.items()}
    found: dict[tuple[Family, str, str], list[str]] = {}
    for family, interfaces in ((Family.IPV4, interfaces4), (Family.IPV6, interfaces6)):
        for interface in sorted(interfaces - {""}):
            _, _, gateway, cidr = _interface_row(rows.get(interface, ""), family)
            found.setdefault((family, cidr, gateway), []).append(interface)
    return tuple(PoolSubnet(f, cidr, gateway, tuple(ids)) for (f, cidr, gateway), ids in found.items())


def _allocation(item: dict[str, Any], pool: str, vpc: str) -> Allocation:
    family = Family.IPV4 if item["family"] == "4" else Family.IPV6
    mac, device_index, gateway, subnet = _interface_row(item.get("info") or "", family)
    return Allocation(
        ip=item["ip"],
        family=family,
        pool=pool,
        owner=item["owner"],
        interface_id=item.get("iface", ""),
        mac=mac,
        device_index=device_index,
        gateway_ip=gateway,
        subnet_cidr=subnet,
        expiration_uuid=item.get("uuid", ""),
        vpc_cidrs=tuple(vpc.split()),
    )


class RedisStore:
    """Pools, allocations, owners, timers and node records in Redis."""

    def __init__(
        self,
        client: RedisClient,
        *,
        reuse_cooldown_ms: int,
        pipelined: PipelinedConnection | None = None,
        timeout_s: float = 1.0,
        min_replicas: int = 0,
        replica_wait_s: float = 0.5,
    ) -> None:
        """`pipelined`: the connection the pool scripts go through (else `client`, e.g. a cluster).
        `timeout_s`: how long a call waits for Redis (the clients' own timeout), unless the caller's
        deadline (`CallScope`) comes first. `min_replicas`: a pool script's change is answered only
        once that many replicas hold it (`WAIT`, at most `replica_wait_s`), else `OutcomeUnknown`;
        the pipelined connection must be made with the same (`PipelinedConnection.min_replicas`)."""
        if pipelined is not None and pipelined.min_replicas != min_replicas:
            raise ValueError("the pipelined connection must wait for as many replicas as the store")
        self.client = client
        self._pipelined = pipelined
        self.timeout_s = timeout_s
        self.min_replicas = min_replicas
        self.replica_wait_s = replica_wait_s
        self.reuse_cooldown_ms = reuse_cooldown_ms
        self._loading: asyncio.Future[Any] | None = None

    async def close(self) -> None:
        if self._pipelined is not None:
            await self._pipelined.close()
        await self.client.aclose()

    async def ping(self) -> bool:
        return bool(await self.call(lambda: self.client.ping()))

    # --- plumbing -------------------------------------------------------------------------

    def _budget(self) -> tuple[float, bool]:
        """How long the next Redis call may wait, and whether the caller's deadline set that bound."""
        scope = current_call_scope()
        if scope is None or scope.deadline is None:
            return self.timeout_s, False
        left = scope.deadline - time.monotonic() - DEADLINE_MARGIN_S
        return (left, True) if left < self.timeout_s else (self.timeout_s, False)

    async def call(
        self, op: Callable[[], Awaitable[T]], *, change: bool = False, exact: bool = False, bounded: bool = False
    ) -> T:
        """Runs one Redis operation within the caller's deadline.

        An unreachable or not-ready Redis becomes `Unavailable` ("nothing happened"), except for a
        `change` that may have reached Redis: that becomes `OutcomeUnknown`. Through redis-py a
        timeout or a broken connection may come after the command was written, so a change failing
        there is `OutcomeUnknown`; an `exact` operation (the pipelined connection) tells the two apart.
        A `bounded` operation ends its own wait by the caller's deadline (no timer is set here)."""
        budget, by_deadline = self._budget()
        if budget <= 0:
            raise self._unavailable(
                "redis did not answer within the call's deadline (too little of it was left to ask redis "
                "again): nothing was changed"
            )
        try:
            if bounded or not by_deadline:
                return await op()
            async with asyncio.timeout(budget):
                return await op()
        except NotReplicatedError as exc:
            if change:
                raise _not_replicated(exc, self.min_replicas) from exc
            return exc.reply  # type: ignore[no-any-return]
        except OutcomeUnknownError as exc:
            if change:
                raise _outcome_unknown(f"{budget:.2f} s") from exc
            raise self._unavailable(f"redis is unreachable: {exc}") from exc
        except TimeoutError as exc:  # the caller's deadline, cut short here
            if change:
                raise _outcome_unknown(f"{budget:.2f} s (the call's deadline)") from exc
            raise self._unavailable(f"redis did not answer within {budget:.2f} s (the call's deadline)") from exc
        except (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError) as exc:
            if change and not exact:
                raise _outcome_unknown(f"{self.timeout_s:g} s") from exc
            raise self._unavailable(f"redis is unreachable: {type(exc).__name__}: {exc}") from exc
        except ReadOnlyError as exc:
            raise self._unavailable(f"redis is a replica now (a failover): nothing was changed: {exc}") from exc
        except (MovedError, AskError) as exc:
            raise self._unavailable(f"the pool's slot moved to another node: nothing was changed: {exc}") from exc
        except ResponseError as exc:
            if any(word in str(exc) for word in ("LOADING", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")):
                raise self._unavailable(f"redis is not ready: {exc}") from exc
            raise

    def _unavailable(self, message: str) -> Unavailable:
        """A "nothing happened" error; `final` when the caller's deadline leaves no room for a try as
        long as this one, so that a retry could only end in a bare DEADLINE_EXCEEDED."""
        error = Unavailable(message)
        scope = current_call_scope()
        error.final = (
            scope is not None and scope.deadline is not None and (scope.deadline - time.monotonic() < self.timeout_s)
        )
        return error

    async def _eval(self, script: str, node: str, pool: str, args: Sequence[Any]) -> Any:
        """One pool script's raw answer."""
        argv = (pool, self.reuse_cooldown_ms, *args)
        function = POOL_LIBRARY.functions[script]
        pool_keys = keys.pool_keys(node, pool)
        change = script not in _READ_ONLY
        replicate = change and self.min_replicas > 0
        if self._pipelined is not None:
            # The pipelined connection bounds its own wait by the caller's deadline; not yet a wait
            # for replicas, whose reply it holds as unsent when the deadline comes.
            return await self.call(
                lambda: self._eval_pipelined(function, pool_keys, argv, replicate),
                change=change,
                exact=True,
                bounded=not replicate,
            )
        if replicate:
            return await self.call(lambda: self._eval_replicated(function, pool_keys, argv), change=change)
        return await self.call(lambda: self._eval_plain(function, pool_keys, argv), change=change)

    async def _run(
        self, script: str, node: str, pool: str, *args: Any, ip: str = "", owner: str = "", prefix: str = ""
    ) -> dict[str, Any]:
        """A script answering JSON; its failure raised as the domain's exception."""
        result: dict[str, Any] = json.loads(await self._eval(script, node, pool, args))
        failure = result.get("err")
        if failure:
            if failure == ErrorReason.POOL_EMPTY:
                raise self._pool_empty(
                    node,
                    pool,
                    result["family"],
                    result["cooling"],
                    result.get("reason_hint"),
                    _pool_state(result["state"]),
                )
            raise self._failure(
                failure,
                node,
                pool,
                _text(result.get("ip")) or ip,
                owner,
                result.get("owner"),
                prefix=_text(result.get("prefix")) or prefix,
            )
        return result

    async def _run_flat(
        self, script: str, node: str, pool: str, *args: Any, ip: str = "", owner: str = ""
    ) -> list[Any]:
        """A script answering flat values, a failure's reason first ("" when none); the hot path's
        scripts, whose answers are decoded without JSON."""
        result: list[Any] = await self._eval(script, node, pool, args)
        failure = result[0]
        if failure:
            if failure == b"POOL_EMPTY":
                raise self._pool_empty(node, pool, result[1], result[2], result[3], _flat_state(result, 4))
            raise self._failure(_text(failure), node, pool, ip, owner)
        return result

    def _failure(
        self, failure: str, node: str, pool: str, ip: str, owner: str, holder: Any = None, *, prefix: str = ""
    ) -> IpamError:
        reason = ErrorReason(failure)
        exc_type, template = _FAILURES[reason]
        message = template.format(node=node, pool=pool, ip=ip, owner=owner, prefix=prefix)
        if reason == ErrorReason.IP_ALREADY_ALLOCATED:
            return IpAlreadyAllocated(message, current_owner=_text(holder), node=node, pool=pool)
        return exc_type(message, reason=reason, node=node, pool=pool)

    async def _load_library(self, pipelined: PipelinedConnection | None = None) -> None:
        """Loads the pool library into a Redis that lacks it (a fresh or flushed Redis), over
        `pipelined` or else through redis-py (on a cluster, every master); callers that find it
        missing meanwhile wait for the same load."""
        if self._loading is None or self._loading.done():
            code = POOL_LIBRARY.code
            load: Awaitable[Any]
            if pipelined is not None:
                load = pipelined.execute("FUNCTION", "LOAD", "REPLACE", code)
            else:
                load = self.client.function_load(code, replace=True)
            self._loading = asyncio.ensure_future(load)
            self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._loading)

    async def _eval_plain(self, function: str, pool_keys: Sequence[Any], argv: Sequence[Any]) -> Any:
        """One FCALL through redis-py (a cluster routes it by its keys)."""
        try:
            return await self.client.fcall(function, len(pool_keys), *pool_keys, *argv)
        except ResponseError as exc:
            if not is_function_missing(exc):
                raise
        await self._load_library()
        return await self.client.fcall(function, len(pool_keys), *pool_keys, *argv)

    async def _eval_pipelined(
        self, function: str, pool_keys: Sequence[Any], argv: Sequence[Any], replicate: bool
    ) -> Any:
        pipelined = self._pipelined
        assert pipelined is not None
        budget, by_deadline = self._budget()
        timeout_s = budget if by_deadline else None
        args = ("FCALL", function, len(pool_keys), *pool_keys, *argv)
        try:
            return await pipelined.execute(*args, timeout_s=timeout_s, replicate=replicate)
        except ResponseError as exc:
            if not is_function_missing(exc):
                raise
        await self._load_library(pipelined)
        return await pipelined.execute(*args, timeout_s=timeout_s, replicate=replicate)

    async def _eval_replicated(self, function: str, pool_keys: Sequence[Any], argv: Sequence[Any]) -> Any:
        """The script and `WAIT` on one connection, through redis-py: on a Redis Cluster, on the node
        that holds the pool's slot. `NotReplicatedError` when too few replicas confirmed."""
        budget, _ = self._budget()
        wait_ms = max(1, int(min(self.replica_wait_s, budget) * 1000))
        args = ("FCALL", function, len(pool_keys), *pool_keys, *argv)
        for attempt in range(2):
            if isinstance(self.client, RedisCluster):
                raw, acks = await self._eval_on_slot_node(self.client, pool_keys[0], args, wait_ms)
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.execute_command(*args)
                pipe.execute_command("WAIT", self.min_replicas, wait_ms)
                raw, acks = await pipe.execute(raise_on_error=False)
            if is_function_missing(raw) and attempt == 0:
                await self._load_library()
                continue
            break
        if isinstance(raw, Exception):
            raise raw
        if isinstance(acks, Exception) or int(acks) < self.min_replicas:
            count = 0 if isinstance(acks, Exception) else int(acks)
            raise NotReplicatedError(f"{count} of {self.min_replicas} replicas confirmed", reply=raw, acks=count)
        return raw

    async def _eval_on_slot_node(
        self, cluster: RedisCluster, key: Any, args: Sequence[Any], wait_ms: int
    ) -> tuple[Any, Any]:
        # redis-py's cluster pipeline may resend a failed command to another node and the WAIT to
        # a third: here both go, once, on one connection to the node the client maps the slot to.
        commands = [PipelineCommand(0, *args), PipelineCommand(1, "WAIT", self.min_replicas, wait_ms)]
        node = cluster.get_node_from_key(key)
        if node is None:
            raise RedisClusterException("no node serves the pool's slot")
        try:
            await node.execute_pipeline(commands)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._refresh_slot(cluster, key)
            raise
        raw, acks = commands[0].result, commands[1].result
        if isinstance(raw, (MovedError, AskError, RedisConnectionError, RedisTimeoutError)):
            self._refresh_slot(cluster, key)
        return raw, acks

    def _refresh_slot(self, cluster: RedisCluster, key: Any) -> None:
        """Has redis-py learn where the slot is now (it follows MOVED and failovers on its own calls)."""
        task = asyncio.ensure_future(cluster.exists(key))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _pool_empty(
        self, node: str, pool: str, family_tag: Any, cooling_count: Any, hint: Any, state: PoolState
    ) -> PoolEmpty:
        cooling = int(cooling_count) > 0
        reason = ErrorReason.POOL_COOLING_DOWN if cooling else pool_empty_reason(_text(hint))
        family = Family.IPV4 if _text(family_tag) == "4" else Family.IPV6
        if reason == ErrorReason.POOL_EMPTY and 0 < state.watermarks.max_allocate <= state.counts[family].available:
            reason = ErrorReason.POOL_AT_MAX_ALLOCATE  # no refill may come: say so, not "requested"
        return PoolEmpty(
            f"pool {pool} of node {node} has no free {_FAMILY_NAME[family]} address: {_POOL_EMPTY_WHY[reason]}",
            reason=reason,
            family=family,
            state=state,
            node=node,
            pool=pool,
        )

    # --- allocation -------------------------------------------------------------------------

    async def allocate_next(
        self,
        node: str,
        pool: str,
        families: Sequence[Family],
        owner: str,
        idempotency_key: str,
        expiration_s: int,
    ) -> AllocateOutcome:
        tags = _FAMILY_TAGS.get(tuple(families)) or "".join(f.tag for f in families)
        uuids = (str(uuid.uuid4()), str(uuid.uuid4())) if expiration_s else ("", "")
        result = await self._run_flat(
            "allocate_next", node, pool, tags, owner, idempotency_key, expiration_s * 1000, *uuids
        )
        replayed = result[1] == 1
        vpc_cidrs = tuple(_text(result[2]).split())
        end = 4 + 6 * result[3]
        allocations = [_flat_allocation(result, i, pool, vpc_cidrs) for i in range(4, end, 6)]
        if expiration_s and not replayed:
            # The allocation is made: a failure to index its timer must not fail the call (the
            # sweeper's periodic full scan indexes it).
            with contextlib.suppress(Unavailable, OutcomeUnknown):
                await self._index_timer(node, pool, int(time.time() * 1000) + expiration_s * 1000)
        state = _flat_state(result, end) if len(result) > end else None
        return AllocateOutcome(allocations, state, replayed)

    async def allocate(self, node: str, pool: str, ip: str, owner: str, idempotency_key: str = "") -> AllocateOutcome:
        result = await self._run("allocate", node, pool, ip, owner, idempotency_key, ip=ip)
        vpc = _text(result.get("vpc"))
        allocations = [_allocation(a, pool, vpc) for a in _as_list(result["allocations"])]
        return AllocateOutcome(allocations, _pool_state(result["state"]), bool(result.get("replayed")))

    async def release(self, node: str, pool: str, *, ip: str | None = None, owner: str | None = None) -> ChangeOutcome:
        mode, value = ("ip", ip) if ip is not None else ("owner", owner)
        result = await self._run_flat("release", node, pool, mode, value, ip=ip or "", owner=owner or "")
        end = 2 + result[1]
        state = _flat_state(result, end) if len(result) > end else None
        return ChangeOutcome(state, [_text(i) for i in result[2:end]])

    async def release_by_key(self, node: str, pool: str, idempotency_key: str) -> ChangeOutcome:
        result = await self._run("release_by_key", node, pool, idempotency_key)
        return ChangeOutcome(_pool_state(result["state"]), _as_list(result["released"]))

    async def cancel_call(self, node: str, pool: str, key: str) -> ChangeOutcome:
        """Gives back what the call under `key` took, or makes its script take nothing (see cancel_call.lua)."""
        result = await self._run("cancel_call", node, pool, key)
        return ChangeOutcome(_pool_state(result["state"]), _as_list(result["released"]))

    async def exclude(self, node: str, pool: str, ip: str, owner: str) -> ChangeOutcome:
        result = await self._run("exclude", node, pool, ip, owner, ip=ip)
        return ChangeOutcome(_pool_state(result["state"]))

    async def start_timer(self, node: str, pool: str, ip: str, timeout_s: int) -> str:
        result = await self._run("start_timer", node, pool, ip, timeout_s * 1000, str(uuid.uuid4()), ip=ip)
        await self._index_timer(node, pool, int(time.time() * 1000) + timeout_s * 1000)
        return str(result["uuid"])

    async def stop_timer(self, node: str, pool: str, ip: str, expiration_uuid: str) -> None:
        await self._run("stop_timer", node, pool, ip, expiration_uuid, ip=ip)

    async def expire_due(self, node: str, pool: str, batch: int = 500) -> ChangeOutcome:
        """Releases the addresses whose timer is due; `next_ms` is the next deadline (0 = none)."""
        result = await self._run("expire", node, pool, batch)
        return ChangeOutcome(_pool_state(result["state"]), _as_list(result["released"]), next_ms=int(result["next_ms"]))

    async def _index_timer(self, node: str, pool: str, deadline_ms: int) -> None:
        # The index lives in its own slot, so it is written after the script; a crash in between
        # is repaired by the sweeper's periodic full scan (`timer_deadlines`).
        await self.call(lambda: self.client.zadd(keys.TIMERS_KEY, {keys.node_pool(node, pool): deadline_ms}, lt=True))

    async def due_timers(self, now_ms: int, limit: int = 100) -> list[tuple[str, str]]:
        members = await self.call(lambda: self.client.zrangebyscore(keys.TIMERS_KEY, "-inf", now_ms, 0, limit))
        return [keys.split_node_pool(_text(m)) for m in members]

    async def reindex_timer(self, node: str, pool: str, next_ms: int) -> None:
        member = keys.node_pool(node, pool)
        if next_ms:
            await self.call(lambda: self.client.zadd(keys.TIMERS_KEY, {member: next_ms}))
        else:
            await self.call(lambda: self.client.zrem(keys.TIMERS_KEY, member))

    @staticmethod
    def waiter_id(family: Family, call_id: str) -> str:
        """The waiting set's member for a caller waiting for `family` (the scripts count by its prefix)."""
        return f"{family.tag}:{call_id}"

    async def add_waiter(self, node: str, pool: str, call_id: str, deadline_ms: int) -> None:
        """Counts a caller waiting for a refill until its deadline (or until `remove_waiter`);
        `call_id` from `waiter_id`, so that it counts for its family."""
        await self.call(lambda: self.client.zadd(keys.pool_key(node, pool, "waiting"), {call_id: deadline_ms}))

    async def remove_waiter(self, node: str, pool: str, call_id: str) -> None:
        waiting = keys.pool_key(node, pool, "waiting")

        async def remove() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(waiting, call_id)
            pipe.zremrangebyscore(waiting, "-inf", int(time.time() * 1000))  # and callers long gone
            await pipe.execute()

        await self.call(remove)

    async def next_timer_deadline(self, node: str, pool: str) -> int:
        """The earliest deadline kept in the pool itself (the truth the index mirrors)."""
        first = await self.call(lambda: self.client.zrange(keys.pool_key(node, pool, "exp"), 0, 0, withscores=True))
        return int(first[0][1]) if first else 0

    # --- reads -------------------------------------------------------------------------------

    async def pool_state(self, node: str, pool: str) -> PoolState:
        result = await self._run("pool_state", node, pool)
        return _pool_state(result["state"])

    async def dump(self, node: str, pool: str) -> PoolDump:
        """Allocated addresses (ip -> owner) per family, excluded ones under "<owner> (excluded)",
        the free addresses per family, the subnets of the interfaces holding them, and the IPv4
        prefixes with the use of their addresses."""
        await self.pool_state(node, pool)  # NOT_FOUND for an unknown node or pool

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for name in ("alloc:4", "alloc:6", "excluded", "addrs:4", "addrs:6", "free:6", "prefixes:4"):
                if name.startswith("free"):
                    pipe.zrange(keys.pool_key(node, pool, name), 0, -1)
                else:
                    pipe.hgetall(keys.pool_key(node, pool, name))
            pipe.zrange(keys.pool_key(node, pool, "free:4"), 0, -1, withscores=True)
            pipe.hkeys(keys.pool_key(node, pool, "reserved:4"))
            pipe.hgetall(keys.interface_info_key(node))
            pipe.hmget(keys.pool_key(node, pool, "prefix6"), "cidr", "iface")
            return await pipe.execute()

        alloc4, alloc6, excluded, addrs4, addrs6, free6, prefixes, free4, reserved4, info, prefix6 = await self.call(
            read
        )
        prefix_table = {_text(p): _text(i) for p, i in prefixes.items()}
        in_prefix = {str(a) for p in prefix_table for a in ipaddress.ip_network(p)}
        allocated: tuple[dict[str, str], dict[str, str]] = ({}, {})
        for index, (alloc, addrs) in enumerate(((alloc4, addrs4), (alloc6, addrs6))):
            out = allocated[index]
            for ip, value in alloc.items():
                out[_text(ip)] = _text(value).split("\t", 1)[0]
            for ip, owner in excluded.items():
                ip_s = _text(ip)
                if (ip in addrs or ip_s in in_prefix) and ip_s not in out:
                    out[ip_s] = f"{_text(owner)} (excluded)"
        uses = self._prefix_uses(prefix_table, free4, alloc4.keys(), excluded.keys(), reserved4)
        return PoolDump(
            allocated[0],
            allocated[1],
            [_text(i) for i, _ in free4],
            [_text(i) for i in free6],
            _pool_subnets(
                {_text(i) for i in addrs4.values()} | set(prefix_table.values()),
                {_text(i) for i in addrs6.values()} | ({_text(prefix6[1])} if prefix6[1] else set()),
                info,
            ),
            uses,
            _text(prefix6[0]),
        )

    def _prefix_uses(
        self,
        prefixes: dict[str, str],
        free4: Sequence[tuple[Any, float]],
        allocated: Iterable[Any],
        excluded: Iterable[Any],
        reserved: Iterable[Any],
    ) -> tuple[PrefixUse, ...]:
        if not prefixes:
            return ()
        return prefix_uses(
            prefixes,
            {_text(ip): score for ip, score in free4},
            {_text(ip) for ip in allocated},
            {_text(ip) for ip in excluded},
            {_text(ip) for ip in reserved},
            time.time() * 1000 - self.reuse_cooldown_ms,
        )

    async def _read_prefix_uses(self, node: str, pool: str, prefixes: dict[Any, Any]) -> tuple[PrefixUse, ...]:
        """The use of a pool's prefixes (prefix -> interface id, as read): nothing more is read without any."""
        if not prefixes:
            return ()

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(keys.pool_key(node, pool, "free:4"), 0, -1, withscores=True)
            pipe.hkeys(keys.pool_key(node, pool, "alloc:4"))
            pipe.hkeys(keys.pool_key(node, pool, "excluded"))
            pipe.hkeys(keys.pool_key(node, pool, "reserved:4"))
            return await pipe.execute()

        free4, allocated, excluded, reserved = await self.call(read)
        table = {_text(p): _text(i) for p, i in prefixes.items()}
        return self._prefix_uses(table, free4, allocated, excluded, reserved)

    async def keyed_allocations(self, node: str, pool: str, key_prefix: str = "") -> list[KeyedAllocation]:
        """The pool's allocations whose idempotency key starts with `key_prefix`, sorted by address."""
        await self.pool_state(node, pool)  # NOT_FOUND for an unknown node or pool

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(keys.pool_key(node, pool, "alloc:4"))
            pipe.hgetall(keys.pool_key(node, pool, "alloc:6"))
            return await pipe.execute()

        out: list[KeyedAllocation] = []
        for family, alloc in zip((Family.IPV4, Family.IPV6), await self.call(read), strict=True):
            for ip, value in alloc.items():
                owner, _, idem = (_text(value).split("\t", 2) + ["", ""])[:3]
                if idem.startswith(CALL_KEY_PREFIX):
                    idem = ""  # made without a key
                if idem.startswith(key_prefix):
                    out.append(KeyedAllocation(_text(ip), family, owner, idem))
        return sorted(out, key=lambda a: (a.family, a.ip))

    async def replication(self) -> Replication:
        """Where changes are written (the master the Sentinels name now, one Redis, or a cluster's
        masters) and its replicas: connected, and acknowledging within the last second."""

        def replicas(info: dict[str, Any]) -> tuple[int, int]:
            rows = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            in_sync = [r for r in rows if r.get("state") == "online" and int(r.get("lag", 99)) <= 1]
            return len(rows), len(in_sync)

        if isinstance(self.client, RedisCluster):
            cluster = self.client
            primaries = cluster.get_primaries()
            infos = await self.call(lambda: cluster.execute_command("INFO", "replication", target_nodes=primaries))
            counts = [replicas(info) for info in infos.values()] or [(0, 0)]
            return Replication(
                "cluster",
                "",
                len(primaries),
                min(c[0] for c in counts),
                min(c[1] for c in counts),
                self.min_replicas,
            )
        info = await self.call(lambda: self.client.info("replication"))
        resolve = master_resolver(self.client)
        if resolve is not None:
            host, port = await self.call(resolve)
            mode = "sentinel"
        else:
            kwargs = self.client.connection_pool.connection_kwargs
            host, port, mode = kwargs.get("host", ""), kwargs.get("port", ""), "single"
        connected, in_sync = replicas(info)
        return Replication(mode, f"{host}:{port}", 1, connected, in_sync, self.min_replicas)

    async def node_names(self) -> list[str]:
        return sorted(_text(n) for n in await self.call(lambda: self.client.smembers(keys.NODES_KEY)))

    async def pool_names(self, node: str) -> list[str]:
        """The node's pools (none for an unknown node), without reading its interface table."""
        return sorted(_text(p) for p in await self.call(lambda: self.client.smembers(keys.pools_key(node))))

    async def vpc_cidrs(self, node: str) -> list[str]:
        """The node's VPC CIDRs, without reading its interface table."""

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(keys.node_key(node))
            pipe.hget(keys.node_key(node), "vpc_cidrs")
            return await pipe.execute()

        exists, cidrs = await self.call(read)
        if not exists:
            raise NotFound(f"node {node} is not known", reason=ErrorReason.NODE_NOT_FOUND, node=node)
        return _text(cidrs).split()

    async def node_record(self, node: str, pool: str = "default") -> NodeRecord:
        """The node's record, with the open release reservations of `pool`."""

        async def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(keys.node_key(node))
            pipe.hgetall(keys.interfaces_key(node))
            pipe.smembers(keys.pools_key(node))
            pipe.hgetall(keys.pool_key(node, pool, "resv"))
            pipe.hgetall(keys.pool_key(node, pool, "prefixes:4"))
            pipe.hget(keys.pool_key(node, pool, "prefix6"), "cidr")
            return await pipe.execute()

        fields, ifaces, pools, reservations, prefixes, prefix6 = await self.call(read)
        if not fields:
            raise NotFound(f"node {node} is not known", reason=ErrorReason.NODE_NOT_FOUND, node=node)
        f = {_text(k): v for k, v in fields.items()}
        interfaces = sorted((_interface(v) for v in ifaces.values()), key=lambda i: i.device_index)
        return NodeRecord(
            name=node,
            spec=f.get("spec", b""),
            interfaces=interfaces,
            pools=sorted(_text(p) for p in pools),
            vpc_cidrs=_text(f.get("vpc_cidrs")).split(),
            max_interfaces=_int(_text(f.get("max_ifaces"))),
            ipv4_per_interface=_int(_text(f.get("ipv4_per_iface"))),
            deficit_reason=_text(f.get("deficit_reason")),
            created_ms=_int(_text(f.get("created_ms"))),
            first_interface_index=_int(_text(f.get("first_interface_index"))),
            reservations=[_reservation(k, v) for k, v in reservations.items()],
            last_error=_text(f.get("last_error")),
            last_error_ms=_int(_text(f.get("last_error_ms"))),
            prefixes=await self._read_prefix_uses(node, pool, prefixes),
            ipv6_prefix=_text(prefix6),
        )

    # --- nodes -------------------------------------------------------------------------------

    async def put_node(self, node: str, spec: bytes, settings: NodeSettings, *, create: bool) -> None:
        w = settings.watermarks
        await self._run(
            "put_node",
            node,
            "default",
            "create" if create else "update",
            spec,
            w.pre_allocate,
            w.min_allocate,
            w.max_allocate,
            w.max_above_watermark,
            int(settings.release_excess),
            int(settings.ipv6_enabled),
            settings.first_interface_index,
        )
        # The registry is its own slot: written after the node, so a listed node always exists.
        await self.call(lambda: self.client.sadd(keys.NODES_KEY, node), change=True)

    async def delete_node(self, node: str) -> None:
        record = await self.node_record(node)
        await self.call(lambda: self.client.srem(keys.NODES_KEY, node), change=True)
        doomed = [keys.node_key(node), keys.pools_key(node), keys.interfaces_key(node)]
        for pool in record.pools:
            doomed += keys.pool_keys(node, pool)[3:]
            await self.reindex_timer(node, pool, 0)
        await self.call(lambda: self.client.delete(*doomed), change=True)

    # --- worker-facing -----------------------------------------------------------------------

    async def add_addresses(
        self,
        node: str,
        pool: str,
        interface: NodeInterface,
        ips: Sequence[str],
        facts: CloudFacts,
        *,
        fence: int = 0,
        prefixes: Sequence[str] = (),
    ) -> ChangeOutcome:
        """Adds single addresses and IPv4 /28 `prefixes` (canonical, checked by the caller); the outcome's
        `other_ips` are the prefixes new to the pool."""
        result = await self._run(
            "add_addresses",
            node,
            pool,
            interface.id,
            interface_json(interface),
            " ".join(facts.vpc_cidrs),
            facts.max_interfaces,
            facts.ipv4_per_interface,
            fence,
            " ".join(prefixes),
            *ips,
        )
        return ChangeOutcome(
            _pool_state(result["state"]), _as_list(result["added"]), _as_list(result.get("added_prefixes"))
        )

    async def set_interfaces(
        self,
        node: str,
        interfaces: Sequence[NodeInterface],
        facts: CloudFacts,
        deficit_reason: str,
        *,
        fence: int = 0,
    ) -> None:
        rows = [field for i in interfaces for field in (i.id, interface_json(i), interface_info(i))]
        await self._run(
            "set_interfaces",
            node,
            DEFAULT_POOL,  # the node-wide keys are the same for every pool
            fence,
            " ".join(facts.vpc_cidrs),
            facts.max_interfaces,
            facts.ipv4_per_interface,
            deficit_reason,
            *rows,
        )

    async def set_node_error(self, node: str, error: str) -> None:
        """Keeps the worker's last error on the node with the time it was set ("" clears both)."""
        key = keys.node_key(node)

        async def write() -> Any:
            if not await self.client.exists(key):
                raise NotFound(f"node {node} is not known", reason=ErrorReason.NODE_NOT_FOUND, node=node)
            if not error:
                return await self.client.hdel(key, "last_error", "last_error_ms")
            return await self.client.hset(key, mapping={"last_error": error, "last_error_ms": int(time.time() * 1000)})

        await self.call(write)

    async def reserve_for_release(
        self,
        node: str,
        pool: str,
        family: Family,
        interface_id: str,
        count: int,
        *,
        fence: int = 0,
        prefix: str = "",
    ) -> ChangeOutcome:
        """Reserves up to `count` free single addresses, or with `prefix` that IPv4 /28 whole (all 16 or none)."""
        reservation_id = uuid.uuid4().hex
        result = await self._run(
            "reserve_for_release",
            node,
            pool,
            family.tag,
            interface_id,
            count,
            reservation_id,
            fence,
            prefix,
            prefix=prefix,
        )
        ips = _as_list(result["ips"])
        return ChangeOutcome(_pool_state(result["state"]), ips, reservation_id=reservation_id if ips else "")

    async def complete_release(
        self, node: str, pool: str, reservation_id: str, ips: Sequence[str], *, fence: int = 0
    ) -> ChangeOutcome:
        result = await self._run("complete_release", node, pool, reservation_id, fence, *ips)
        return ChangeOutcome(_pool_state(result["state"]), _as_list(result["released"]), _as_list(result["restored"]))

    async def abort_release(self, node: str, pool: str, reservation_id: str, *, fence: int = 0) -> ChangeOutcome:
        result = await self._run("abort_release", node, pool, reservation_id, fence)
        return ChangeOutcome(_pool_state(result["state"]), _as_list(result["restored"]))

    async def remove_addresses(
        self, node: str, pool: str, ips: Sequence[str], *, fence: int = 0, prefixes: Sequence[str] = ()
    ) -> RemoveOutcome:
        """Drops addresses, and prefixes (IPv4 /28s, the IPv6 /80; canonical) with all their addresses."""
        result = await self._run("remove_addresses", node, pool, fence, " ".join(prefixes), *ips)
        return RemoveOutcome(
            _as_list(result["removed"]),
            _as_list(result["still_allocated"]),
            _as_list(result["newly_lost"]),
            _as_list(result.get("removed_prefixes")),
        )
