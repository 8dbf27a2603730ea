"""`CloudProvider` for AWS EC2, with boto3.

`Ec2Policy` holds EC2's choices (as Cilium's pkg/aws/eni/node.go): the lowest interface with a
free slot in a subnet with free addresses; else a new interface at the lowest free device index
at or above `first_interface_index`, in the subnet chosen by ids, else tags, else the node's own
(most free addresses wins), with the groups carrying the spec's tags, else the spec's, else the
primary interface's, holding at most the per-interface limit less its primary address; excess
given back from the interface with the most free addresses. It makes no call.

Every EC2 call (each Describe page included) goes through `_call`: one token from the `Limiter`
(EC2's token buckets, shared in Redis), throttling slowing the bucket down and retried with
exponential backoff, every `ClientError` turned into a `ProviderError`, and the duration and
limiter wait reported to an `ApiObserver`. botocore's own retries are switched off
(`make_ec2_client`) so that every attempt passes the bucket.

The moto server (the local EC2) enforces no instance or subnet limits and answers some calls
loosely (assigns return every address of the interface, not only the new ones), so every change
is read back with DescribeNetworkInterfaces and new addresses are found by diff.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import boto3
from botocore import exceptions as botocore_errors
from botocore import xform_name
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError
from pydantic import BaseModel, Field, SecretStr, field_validator

from services.cloudworker.metrics import ApiObserver, CloudObserver, NullObserver
from services.cloudworker.model import (
    AddressChange,
    AllocationAction,
    AssignIPv6,
    Instance,
    InstanceLimits,
    NetworkInterface,
    NoAction,
    NodeSpec,
    ReleaseAction,
    SecurityGroup,
    Subnet,
    prefixes_addresses,
    usable_interfaces,
)
from services.cloudworker.providers.base import CloudProvider
from services.cloudworker.providers.errors import (
    LimitExceeded,
    NoPrefixRoom,
    NotFound,
    ProviderError,
    SubnetFull,
    Throttled,
    Transient,
)
from services.cloudworker.ratelimit import Bucket, Limiter, RedisRateLimiter, TokenBucket
from services.core.family import Family
from services.core.prefixes import ADDRESSES_PER_PREFIX, prefix_capacity, prefixes_for, supports_prefixes
from services.core.reasons import DeficitReason

if TYPE_CHECKING:
    from redis import Redis
    from redis.cluster import RedisCluster

log = logging.getLogger(__name__)

# Tags on every interface we create; the leaked-interface collector finds them by these.
MANAGED_BY_TAG = "ipam.io/managed-by"
MANAGED_BY_VALUE = "ipam"
CLUSTER_TAG = "ipam.io/cluster"
NODE_TAG = "ipam.io/node"
CREATED_AT_TAG = "ipam.io/created-at"  # unix seconds
# The VPC router's link-local IPv6 address, the same in every subnet (Amazon VPC User Guide, "Subnet
# CIDR blocks", Subnet sizing for IPv6): an interface's IPv6 gateway.
AWS_IPV6_GATEWAY = "fe80:ec2::1"

_THROTTLING_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "EC2ThrottledException",
    }
)
_SUBNET_FULL_CODES = frozenset({"InsufficientFreeAddressesInSubnet"})
# No free aligned /28 in the subnet. EC2 also answers InvalidParameterValue with this message.
_NO_PREFIX_ROOM_CODE = "InsufficientCidrBlocks"
_NO_PREFIX_ROOM_MESSAGE = "sufficient free ipv4 addresses or prefixes"
_LIMIT_CODES = frozenset(
    {
        "PrivateIpAddressLimitExceeded",
        "AttachmentLimitExceeded",
        "NetworkInterfaceLimitExceeded",
        "AddressLimitExceeded",
    }
)
_NOT_FOUND_CODES = frozenset({"InvalidInstanceType", "InvalidNetworkInterfaceId.Malformed"})
_TRANSIENT_CODES = frozenset(
    {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout"}
)
# Failures below the API: no answer, or an unreadable one.
_NETWORK_ERRORS = (
    botocore_errors.ConnectionError,
    botocore_errors.HTTPClientError,
    ResponseParserError,
)


def classify_error(code: str, http_status: int = 400, message: str = "") -> type[ProviderError]:
    """The `ProviderError` class for an EC2 error code (old "Client."/"Server." prefixes allowed);
    `message` tells EC2's InvalidParameterValue for a subnet without room for a prefix apart."""
    code = code.removeprefix("Client.").removeprefix("Server.")
    if code == _NO_PREFIX_ROOM_CODE or (code == "InvalidParameterValue" and _NO_PREFIX_ROOM_MESSAGE in message.lower()):
        return NoPrefixRoom
    if code in _THROTTLING_CODES:
        return Throttled
    if code in _SUBNET_FULL_CODES:
        return SubnetFull
    if code in _LIMIT_CODES:
        return LimitExceeded
    if code in _NOT_FOUND_CODES or code.endswith(".NotFound"):
        return NotFound
    if code in _TRANSIENT_CODES or http_status >= 500:
        return Transient
    return ProviderError


def _device_index_taken(exc: ProviderError) -> bool:
    """EC2's answer to an attach at an occupied index: InvalidParameterValue, "Instance 'i-…'
    already has an interface attached at device index '1'." (it has no code of its own)."""
    return exc.code == "InvalidParameterValue" and "attached at device index" in exc.message


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for throttled calls (and transient failures of read-only calls)."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1))


def make_ec2_client(
    *,
    region: str,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 20.0,
    max_pool_connections: int = 10,
) -> BaseClient:
    """An EC2 client without botocore's retries (ours count every attempt against the bucket).

    `endpoint_url` None or "" means real AWS; credentials None means boto3's usual chain.
    """
    config = Config(
        retries={"total_max_attempts": 1},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    # A session per client: creating clients from the shared default session is not thread-safe.
    return boto3.session.Session().client(
        "ec2",
        region_name=region,
        endpoint_url=endpoint_url or None,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


# EC2's account-wide buckets per Region (its documented defaults).
NON_MUTATING = Bucket("non-mutating", 100, 20)
MUTATING = Bucket("mutating", 50, 5)
UNFILTERED = Bucket("unfiltered-describe", 50, 10)
ACTION_BUCKETS = {
    name: Bucket(name, 100, 5)
    for name in (
        "AssignPrivateIpAddresses",
        "UnassignPrivateIpAddresses",
        "AssignIpv6Addresses",
        "CreateNetworkInterface",
        "DeleteNetworkInterface",
        "ModifyNetworkInterfaceAttribute",
    )
} | {"CreateTags": Bucket("CreateTags", 100, 10)}
_NARROWING_PARAMS = ("Filters", "MaxResults", "NextToken")


def is_read(operation: str) -> bool:
    """Describe and Get calls change nothing (EC2's non-mutating category)."""
    return operation.startswith(("Describe", "Get"))


class Ec2Budget:
    """Which bucket an EC2 call takes from, and that bucket's size for this worker.

    `share` (0 < share <= 1) scales every bucket: the part of the account's budget this cluster's
    workers may use. `qps`/`burst` > 0 replace the model by one bucket for every call."""

    def __init__(self, share: float = 1.0, *, qps: float = 0.0, burst: int = 0) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"the share of the account's budget must be in (0, 1], got {share}")
        if qps < 0 or (qps > 0 and burst < 1):
            raise ValueError(f"need qps >= 0 and, with qps, burst >= 1; got qps={qps} burst={burst}")
        self.share = share
        self.override = Bucket("all", float(burst), qps) if qps > 0 else None

    def _scaled(self, bucket: Bucket) -> Bucket:
        return Bucket(bucket.name, max(bucket.burst * self.share, 1.0), bucket.rate * self.share)

    def bucket_for(self, operation: str, params: Mapping[str, Any] | None = None) -> Bucket:
        """The bucket a call of `operation` with `params` takes its token from."""
        if self.override is not None:
            return self.override
        if operation in ACTION_BUCKETS:
            return self._scaled(ACTION_BUCKETS[operation])
        if is_read(operation):
            narrowed = any(key in (params or {}) for key in _NARROWING_PARAMS) or any(
                key.endswith("Ids") for key in (params or {})
            )
            return self._scaled(NON_MUTATING if narrowed else UNFILTERED)
        return self._scaled(MUTATING)

    def buckets(self) -> list[Bucket]:
        """Every bucket of this budget (for the metrics)."""
        if self.override is not None:
            return [self.override]
        return [self._scaled(b) for b in (NON_MUTATING, MUTATING, UNFILTERED, *ACTION_BUCKETS.values())]


class AwsSettings(BaseModel):
    """The AWS provider's settings, taken in by the worker's (flags and `IPAM_*` variables alike)."""

    ec2_endpoint_url: str = Field("", description="EC2 endpoint (the moto server locally); empty = real AWS")
    aws_region: str = Field("us-east-1", description="AWS region")
    aws_access_key_id: SecretStr = Field(SecretStr(""), description="empty = boto3's default credential chain")
    aws_secret_access_key: SecretStr = Field(SecretStr(""), description="empty = boto3's default credential chain")
    ec2_account_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the account's EC2 request budget (EC2's token buckets per Region) "
        "this cluster's workers use together",
    )
    ec2_qps: float = Field(
        0.0,
        ge=0,
        description="override: EC2 calls per second in one bucket for every call; 0 = EC2's own buckets",
    )
    ec2_burst: int = Field(20, ge=1, description="with ec2_qps: EC2 calls allowed in a burst")
    ipv6_gateway: str = Field(
        "fe80:ec2::1",
        description="the IPv6 gateway reported with each interface whose subnet has an IPv6 block: "
        "the VPC router's link-local address, which AWS documents for every subnet",
    )
    check_address_conflicts: bool | None = Field(
        None,
        description="after each assignment, read the subnet's interfaces and give back addresses the "
        "cloud handed out twice or reserved; the local EC2 does that, AWS does not, so unset it is on "
        "with an EC2 endpoint URL and off against AWS",
    )

    @property
    def checks_address_conflicts(self) -> bool:
        """Whether each assignment is followed by a read of its subnet (see check_address_conflicts)."""
        if self.check_address_conflicts is None:
            return bool(self.ec2_endpoint_url)
        return self.check_address_conflicts

    @field_validator("ipv6_gateway")
    @classmethod
    def _ipv6_address(cls, value: str) -> str:
        address = ipaddress.ip_address(value)  # a ValueError names the bad value
        if address.version != 6:
            raise ValueError(f"{value} is not an IPv6 address")
        return str(address)


class Ec2Policy:
    """EC2's choices for a step (`CloudPolicy`); pure."""

    def node_instance(self, node: str, instance_id: str, instance_type: str) -> tuple[str, str] | None:
        """The EC2 instance the spec names, once it names both its id and its type."""
        return (instance_id, instance_type) if instance_id and instance_type else None

    def prepare_allocation(
        self,
        spec: NodeSpec,
        wanted: int,
        interfaces: Sequence[NetworkInterface],
        limits: InstanceLimits,
        subnets: Sequence[Subnet],
        tagged_security_groups: Sequence[str] = (),
        no_prefix_room: Collection[str] = (),
    ) -> AllocationAction | NoAction:
        if spec.prefix_delegation and limits.prefix_capable:
            in_prefixes = _prefix_allocation(
                spec, wanted, interfaces, limits, subnets, tagged_security_groups, frozenset(no_prefix_room)
            )
            if in_prefixes is not None:
                return in_prefixes
            # No subnet the node may use has room for a prefix now: this deficit in secondaries.
        # An existing interface with a free slot, in a subnet with free addresses, lowest device first.
        subnets_by_id = {s.id: s for s in subnets}
        blocked_by_subnet = False
        for interface in usable_interfaces(interfaces, spec.first_interface_index):
            room = limits.ipv4_per_interface - interface.ipv4_count
            if room <= 0:
                continue
            subnet = subnets_by_id.get(interface.subnet_id)
            if subnet is None:
                continue
            if subnet.free_addresses <= 0:
                blocked_by_subnet = True
                continue
            return AllocationAction(
                count=min(wanted, room, subnet.free_addresses),
                subnet_id=subnet.id,
                device_index=interface.device_index,
                interface_id=interface.id,
            )

        # Else a new interface at the lowest free device index.
        free_indexes = _free_device_indexes(spec, interfaces, limits)
        if not free_indexes:
            if blocked_by_subnet:
                return NoAction(DeficitReason.SUBNET_FULL, "interfaces with free slots are in full subnets")
            capacity = limits.capacity(spec.first_interface_index)
            if spec.prefix_delegation and limits.prefix_capable:
                capacity = prefix_capacity(limits.max_interfaces, limits.ipv4_per_interface, spec.first_interface_index)
            return NoAction(
                DeficitReason.AT_CAPACITY,
                f"{capacity} usable addresses, all attached",
            )
        subnet = _subnet_for_new_interface(spec, interfaces, limits, subnets)
        if subnet is None:
            return NoAction(DeficitReason.SUBNET_FULL, "no subnet the node may use has free addresses")
        return AllocationAction(
            # The new interface's primary address also comes out of the subnet.
            count=min(wanted, limits.ipv4_per_interface - 1, subnet.free_addresses - 1),
            subnet_id=subnet.id,
            device_index=free_indexes[0],
            security_group_ids=tuple(tagged_security_groups) or _security_groups(spec, interfaces),
        )

    def prepare_release(
        self,
        spec: NodeSpec,
        interfaces: Sequence[NetworkInterface],
        free: Collection[str],
        excess: int,
        family: Family,
    ) -> ReleaseAction | NoAction:
        """Secondaries first, from the interface with the most free ones (ties: lowest device index),
        so a node that fell back to them drifts back to prefixes; then, with 16 or more in excess, a
        prefix whose 16 addresses are all free, from the highest interface holding one."""
        best, most = None, 0
        usable = usable_interfaces(interfaces, spec.first_interface_index)
        for interface in usable:
            count = interface.free_count(family, free)
            if count > most:
                best, most = interface, count
        if best is not None:
            return ReleaseAction(best.id, best.subnet_id, min(most, excess), family)
        if family is Family.IPV4 and excess >= ADDRESSES_PER_PREFIX:
            for interface in reversed(usable):
                for prefix in reversed(interface.whole_prefixes(free)):
                    return ReleaseAction(interface.id, interface.subnet_id, ADDRESSES_PER_PREFIX, family, prefix)
        return NoAction(DeficitReason.NOTHING_RELEASABLE, f"{excess} in excess, no interface holds a free address")

    def prepare_ipv6_allocation(
        self, spec: NodeSpec, interfaces: Sequence[NetworkInterface], limits: InstanceLimits, wanted: int
    ) -> AssignIPv6 | None:
        """On the lowest usable interface with room, within the type's IPv6 addresses per interface.
        In prefix mode (`spec.prefix_delegation` on a type that takes prefixes), as the VPC CNI's IPv6
        mode: one /80 for the node, on its first usable interface (the primary one unless
        `first_interface_index` leaves it out) when its subnet has an IPv6 block; none once the node
        holds a /80, whatever `wanted` (its 2^48 addresses serve every caller)."""
        if spec.prefix_delegation and limits.prefix_capable:
            return _ipv6_prefix_allocation(spec, interfaces, limits)
        for interface in interfaces:
            room = limits.ipv6_per_interface - len(interface.ipv6)
            if interface.device_index >= spec.first_interface_index and room > 0:
                return AssignIPv6(interface.id, min(wanted, room))
        return None


def _ipv6_prefix_allocation(
    spec: NodeSpec, interfaces: Sequence[NetworkInterface], limits: InstanceLimits
) -> AssignIPv6 | None:
    """One /80 on the lowest usable interface, unless the node holds one already (or that interface's
    subnet has no IPv6 block, or the type takes no IPv6)."""
    usable = usable_interfaces(interfaces, spec.first_interface_index)
    if not usable or any(i.ipv6_prefixes for i in usable):
        return None
    first = usable[0]
    if not first.subnet_ipv6_cidr or limits.ipv6_per_interface - len(first.ipv6) <= 0:
        return None
    return AssignIPv6(first.id, 0, prefix=True)


def _prefix_allocation(
    spec: NodeSpec,
    wanted: int,
    interfaces: Sequence[NetworkInterface],
    limits: InstanceLimits,
    subnets: Sequence[Subnet],
    tagged_security_groups: Sequence[str],
    no_prefix_room: frozenset[str],
) -> AllocationAction | None:
    """⌈wanted / 16⌉ prefixes on the lowest interface with free slots in a subnet with room for
    them, else on a new interface in another subnet; None when no subnet may take a prefix now
    (those of `no_prefix_room` had no free /28 lately)."""
    subnets_by_id = {s.id: s for s in subnets}
    for interface in usable_interfaces(interfaces, spec.first_interface_index):
        room = limits.ipv4_per_interface - interface.ipv4_count
        subnet = subnets_by_id.get(interface.subnet_id)
        if room <= 0 or subnet is None:
            continue
        count = min(prefixes_for(wanted, room), subnet.free_addresses // ADDRESSES_PER_PREFIX)
        if subnet.id in no_prefix_room or count <= 0:
            continue
        return AllocationAction(
            count=0, prefixes=count, subnet_id=subnet.id, device_index=interface.device_index, interface_id=interface.id
        )
    free_indexes = _free_device_indexes(spec, interfaces, limits)
    if not free_indexes:
        return None
    # The new interface's primary address also comes out of the subnet.
    roomy = [s for s in subnets if s.id not in no_prefix_room and s.free_addresses > ADDRESSES_PER_PREFIX]
    subnet = _subnet_for_new_interface(spec, interfaces, limits, roomy)
    if subnet is None:
        return None
    count = min(
        prefixes_for(wanted, limits.ipv4_per_interface - 1), (subnet.free_addresses - 1) // ADDRESSES_PER_PREFIX
    )
    return AllocationAction(
        count=0,
        prefixes=count,
        subnet_id=subnet.id,
        device_index=free_indexes[0],
        security_group_ids=tuple(tagged_security_groups) or _security_groups(spec, interfaces),
    )


def _free_device_indexes(spec: NodeSpec, interfaces: Sequence[NetworkInterface], limits: InstanceLimits) -> list[int]:
    """Device indexes in [first_interface_index, max_interfaces) without an interface."""
    slots_left = limits.max_interfaces - len(interfaces)
    if slots_left <= 0:
        return []
    taken = {i.device_index for i in interfaces}
    free = [d for d in range(spec.first_interface_index, limits.max_interfaces) if d not in taken]
    return free[:slots_left]


def _subnet_for_new_interface(
    spec: NodeSpec,
    interfaces: Sequence[NetworkInterface],
    limits: InstanceLimits,
    subnets: Sequence[Subnet],
) -> Subnet | None:
    """By subnet ids, else by subnet tags (never widened); else the node's own subnet if it can
    fill a whole interface, else the subnet of the node's VPC and zone with the most free addresses.
    Among candidates the most free addresses wins. A subnet needs 2 free addresses: primary + 1."""
    usable = [
        s
        for s in subnets
        if s.free_addresses > 1
        and (not spec.vpc_id or s.vpc_id == spec.vpc_id)
        and (not spec.availability_zone or s.availability_zone == spec.availability_zone)
    ]
    if spec.subnet_ids:
        candidates = [s for s in usable if s.id in spec.subnet_ids]
    elif spec.subnet_tags:
        candidates = [s for s in usable if all(s.tags.get(k) == v for k, v in spec.subnet_tags.items())]
    else:
        node_subnet_id = next((i.subnet_id for i in interfaces if i.device_index == 0), "")
        for s in usable:
            if s.id == node_subnet_id and s.free_addresses >= limits.ipv4_per_interface:
                return s
        candidates = usable
    return min(candidates, key=lambda s: (-s.free_addresses, s.id), default=None)


def _security_groups(spec: NodeSpec, interfaces: Sequence[NetworkInterface]) -> tuple[str, ...]:
    """The spec's security groups, else those of the primary interface."""
    if spec.security_group_ids:
        return spec.security_group_ids
    return next((i.security_group_ids for i in interfaces if i.device_index == 0), ())


class AwsProvider(Ec2Policy, CloudProvider):
    """EC2 as a `CloudProvider` for one cluster: its calls, and `Ec2Policy`'s choices. Thread-safe:
    boto3 clients and the bucket are."""

    def __init__(
        self,
        client: BaseClient,
        *,
        cluster: str,
        limiter: Limiter,
        retry: RetryPolicy = RetryPolicy(),
        observer: ApiObserver | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        page_size: int = 1000,
        ipv6_gateway: str = AWS_IPV6_GATEWAY,
    ) -> None:
        """`sleep` is used for backoff between retries, `clock` (wall time) for the created-at tag;
        `ipv6_gateway`: the VPC router's IPv6 address, given with each interface whose subnet has IPv6."""
        if not cluster:
            raise ValueError("cluster name is required: it tags the interfaces we create")
        self.client = client
        self.cluster = cluster
        self.limiter = limiter
        self._retry = retry
        self._observer: ApiObserver = observer or NullObserver()
        self._sleep = sleep
        self._clock = clock
        self._page_size = page_size
        # Never change once known. Plain dicts: a race only costs a duplicate lookup.
        self._limits: dict[str, InstanceLimits] = {}
        # Nodes of one type maintained at once ask for its limits together: one asks EC2.
        self._limits_lock = threading.Lock()
        self._subnet_cidrs: dict[str, tuple[str, str]] = {}  # subnet id -> (IPv4 CIDR, IPv6 CIDR or "")
        self.ipv6_gateway = ipv6_gateway

    # --- CloudProvider -------------------------------------------------------------------------

    def instance_limits(self, instance_type: str) -> InstanceLimits:
        cached = self._limits.get(instance_type)
        if cached is not None:
            return cached
        with self._limits_lock:
            cached = self._limits.get(instance_type)
            return cached if cached is not None else self._describe_instance_type(instance_type)

    def _describe_instance_type(self, instance_type: str) -> InstanceLimits:
        try:
            types = self._call("DescribeInstanceTypes", InstanceTypes=[instance_type]).get("InstanceTypes", [])
        except NotFound as exc:
            raise NotFound(
                f"unknown instance type {instance_type!r}: {exc.message}",
                code=exc.code,
                operation=exc.operation,
            ) from exc
        if not types:
            raise NotFound(f"unknown instance type {instance_type!r}", operation="DescribeInstanceTypes")
        network = types[0].get("NetworkInfo", {})
        limits = InstanceLimits(
            max_interfaces=int(network.get("MaximumNetworkInterfaces", 0)),
            ipv4_per_interface=int(network.get("Ipv4AddressesPerInterface", 0)),
            ipv6_per_interface=int(network.get("Ipv6AddressesPerInterface", 0)) if network.get("Ipv6Supported") else 0,
            prefix_capable=supports_prefixes(types[0].get("Hypervisor"), bool(types[0].get("BareMetal"))),
        )
        if limits.max_interfaces <= 0 or limits.ipv4_per_interface <= 0:
            # Never plan with zeros (Cilium #14802: unknown types failing silently).
            raise ProviderError(
                f"EC2 reports no interface limits for {instance_type!r}: {network}",
                operation="DescribeInstanceTypes",
            )
        self._limits[instance_type] = limits
        return limits

    def describe_instance(self, instance_id: str) -> Instance:
        response = self._call("DescribeInstances", InstanceIds=[instance_id])
        found = [i for r in response.get("Reservations", []) for i in r.get("Instances", [])]
        if not found:
            raise NotFound(f"instance {instance_id} not found", operation="DescribeInstances")
        return _parse_instance(found[0])

    def describe_instances(self, instance_ids: Sequence[str]) -> list[Instance]:
        if not instance_ids:
            return []
        try:
            response = self._call("DescribeInstances", InstanceIds=list(instance_ids))
        except NotFound:
            # One id unknown fails the whole batch: the rest are described one by one.
            found = []
            for instance_id in instance_ids:
                try:
                    found.append(self.describe_instance(instance_id))
                except NotFound:
                    continue
            return found
        return [_parse_instance(i) for r in response.get("Reservations", []) for i in r.get("Instances", [])]

    def list_vpc_interfaces(self, vpc_id: str) -> list[tuple[str, NetworkInterface]]:
        raws = self._paginate(
            "DescribeNetworkInterfaces",
            "NetworkInterfaces",
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
            MaxResults=self._page_size,
        )
        attached = [r for r in raws if (r.get("Attachment") or {}).get("InstanceId")]
        return list(
            zip(
                [r["Attachment"]["InstanceId"] for r in attached],
                self._parse_interfaces(attached),
                strict=True,
            )
        )

    def list_subnets(self, vpc_id: str, availability_zone: str = "") -> list[Subnet]:
        filters = [{"Name": "vpc-id", "Values": [vpc_id]}]
        if availability_zone:
            filters.append({"Name": "availability-zone", "Values": [availability_zone]})
        raws = self._paginate("DescribeSubnets", "Subnets", Filters=filters, MaxResults=self._page_size)
        subnets = [_parse_subnet(raw) for raw in raws]
        self._subnet_cidrs.update((s.id, (s.cidr, s.ipv6_cidr)) for s in subnets)
        return subnets

    def list_security_groups(self, vpc_id: str) -> list[SecurityGroup]:
        raws = self._paginate(
            "DescribeSecurityGroups",
            "SecurityGroups",
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
            MaxResults=self._page_size,
        )
        return [
            SecurityGroup(
                id=raw["GroupId"],
                vpc_id=raw.get("VpcId", ""),
                tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])},
            )
            for raw in raws
        ]

    def list_interfaces(self, instance_id: str) -> list[NetworkInterface]:
        raws = self._paginate(
            "DescribeNetworkInterfaces",
            "NetworkInterfaces",
            Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}],
            MaxResults=self._page_size,
        )
        return sorted(self._parse_interfaces(raws), key=lambda i: i.device_index)

    def create_interface(
        self,
        *,
        instance_id: str,
        node: str,
        subnet_id: str,
        security_group_ids: Sequence[str],
        device_index: int,
        ipv4_count: int,
        ipv4_prefix_count: int = 0,
    ) -> NetworkInterface:
        if ipv4_count > 0 and ipv4_prefix_count > 0:
            raise ValueError("an interface is created with secondary addresses or with prefixes, not both")
        tags = {
            MANAGED_BY_TAG: MANAGED_BY_VALUE,
            CLUSTER_TAG: self.cluster,
            NODE_TAG: node,
            CREATED_AT_TAG: str(int(self._clock())),
        }
        params: dict[str, Any] = {
            "SubnetId": subnet_id,
            "Description": f"ipam ({instance_id})",
            "TagSpecifications": [
                {
                    "ResourceType": "network-interface",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        }
        if security_group_ids:  # else EC2 applies the VPC's default group
            params["Groups"] = list(security_group_ids)
        if ipv4_count > 0:  # requested in the same call: no second round trip
            params["SecondaryPrivateIpAddressCount"] = ipv4_count
        if ipv4_prefix_count > 0:
            params["Ipv4PrefixCount"] = ipv4_prefix_count
        created = self._call("CreateNetworkInterface", **params)["NetworkInterface"]
        interface_id = created["NetworkInterfaceId"]

        try:
            attachment_id = self._call(
                "AttachNetworkInterface",
                NetworkInterfaceId=interface_id,
                InstanceId=instance_id,
                DeviceIndex=device_index,
            )["AttachmentId"]
        except ProviderError as exc:
            self._delete_quietly(interface_id)
            if _device_index_taken(exc):
                # Someone else (another agent, an operator) attached an interface there since we
                # listed the instance's interfaces: re-read and take the next free index.
                raise LimitExceeded(exc.message, code=exc.code, operation=exc.operation) from exc
            raise
        try:
            self._call(
                "ModifyNetworkInterfaceAttribute",
                NetworkInterfaceId=interface_id,
                Attachment={"AttachmentId": attachment_id, "DeleteOnTermination": True},
            )
        except ProviderError as exc:
            # Keep it: it is attached and usable. Should the instance go away, the interface turns
            # `available` and, being tagged, is deleted by the leaked-interface collector.
            log.warning("could not set DeleteOnTermination on %s: %s", interface_id, exc)
        answered = self._parse_interfaces([created])[0]
        complete = len(answered.ipv4) == ipv4_count and len(answered.ipv4_prefixes) == ipv4_prefix_count
        if complete and answered.primary_ip:
            # The creation's answer says it all; the attachment we made gives the rest: no read-back.
            return replace(answered, device_index=device_index, status="in-use")
        return self._read_interface(interface_id)

    def assign_addresses(
        self, interface_id: str, count: int, family: Family = Family.IPV4, *, known: NetworkInterface | None = None
    ) -> AddressChange:
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        before = known if known is not None and known.id == interface_id else self._read_interface(interface_id)
        if family is Family.IPV4:
            answer = self._call(
                "AssignPrivateIpAddresses",
                NetworkInterfaceId=interface_id,
                SecondaryPrivateIpAddressCount=count,
            )
            answered = [a.get("PrivateIpAddress", "") for a in answer.get("AssignedPrivateIpAddresses", [])]
        elif family is Family.IPV6:
            answer = self._call("AssignIpv6Addresses", NetworkInterfaceId=interface_id, Ipv6AddressCount=count)
            answered = [str(ipaddress.ip_address(ip)) for ip in answer.get("AssignedIpv6Addresses", [])]
        else:
            raise ValueError(f"family must be IPV4 or IPV6, got {family!r}")
        # moto answers with every address of the interface, EC2 with the new ones: diff either way.
        old = set(_addresses(before, family))
        new = [ip for ip in dict.fromkeys(answered) if ip and ip not in old and ip != before.primary_ip]
        if len(new) == count:  # the answer says it all: no read-back
            if family is Family.IPV4:
                return AddressChange(tuple(new), replace(before, ipv4=(*before.ipv4, *new)))
            return AddressChange(tuple(new), replace(before, ipv6=(*before.ipv6, *new)))
        after = self._read_interface(interface_id)
        return AddressChange(tuple(ip for ip in _addresses(after, family) if ip not in old), after)

    def assign_prefixes(self, interface_id: str, count: int, *, known: NetworkInterface | None = None) -> AddressChange:
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        before = known if known is not None and known.id == interface_id else self._read_interface(interface_id)
        answer = self._call("AssignPrivateIpAddresses", NetworkInterfaceId=interface_id, Ipv4PrefixCount=count)
        old = set(before.ipv4_prefixes)
        new = [
            p
            for p in dict.fromkeys(a.get("Ipv4Prefix", "") for a in answer.get("AssignedIpv4Prefixes", []))
            if p and p not in old
        ]
        if len(new) == count:  # EC2 assigns all or nothing, and answers with the new ones
            after = replace(before, ipv4_prefixes=(*before.ipv4_prefixes, *new))
        else:
            after = self._read_interface(interface_id)
            new = [p for p in after.ipv4_prefixes if p not in old]
        return AddressChange(prefixes_addresses(new), after, tuple(new))

    def assign_ipv6_prefix(self, interface_id: str, *, known: NetworkInterface | None = None) -> AddressChange:
        """One IPv6 /80 (AssignIpv6Addresses with Ipv6PrefixCount 1), read back: once per node, so the
        interface as DescribeNetworkInterfaces lists it (its Ipv6Prefixes) is worth the call."""
        before = known if known is not None and known.id == interface_id else self._read_interface(interface_id)
        self._call("AssignIpv6Addresses", NetworkInterfaceId=interface_id, Ipv6PrefixCount=1)
        after = self._read_interface(interface_id)
        new = tuple(p for p in after.ipv6_prefixes if p not in before.ipv6_prefixes)
        return AddressChange((), after, new)

    def unassign_prefixes(
        self, interface_id: str, prefixes: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        if not prefixes:
            raise ValueError("no prefixes to unassign")
        wanted = [str(ipaddress.ip_network(p, strict=False)) for p in prefixes]
        self._call(
            "UnassignPrivateIpAddresses",
            NetworkInterfaceId=interface_id,
            Ipv4Prefixes=wanted,
        )
        if known is not None and known.id == interface_id:
            after = replace(known, ipv4_prefixes=tuple(p for p in known.ipv4_prefixes if p not in wanted))
            return AddressChange(prefixes_addresses(wanted), after, tuple(wanted))
        after = self._read_interface(interface_id)
        gone = [p for p in wanted if p not in after.ipv4_prefixes]
        return AddressChange(prefixes_addresses(gone), after, tuple(gone))

    def unassign_addresses(
        self, interface_id: str, ips: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        if not ips:
            raise ValueError("no addresses to unassign")
        wanted = [str(ipaddress.ip_address(ip)) for ip in ips]
        ipv4 = [ip for ip in wanted if ipaddress.ip_address(ip).version == 4]
        ipv6 = [ip for ip in wanted if ipaddress.ip_address(ip).version == 6]
        if ipv4:
            self._call("UnassignPrivateIpAddresses", NetworkInterfaceId=interface_id, PrivateIpAddresses=ipv4)
        if ipv6:
            self._call("UnassignIpv6Addresses", NetworkInterfaceId=interface_id, Ipv6Addresses=ipv6)
        if known is not None and known.id == interface_id:
            # Both calls answered success: EC2 unassigns all the addresses named or none.
            gone = set(wanted)
            after = replace(
                known,
                ipv4=tuple(ip for ip in known.ipv4 if ip not in gone),
                ipv6=tuple(ip for ip in known.ipv6 if ip not in gone),
            )
            return AddressChange(tuple(wanted), after)
        after = self._read_interface(interface_id)
        remaining = {after.primary_ip, *after.ipv4, *after.ipv6}
        return AddressChange(tuple(ip for ip in wanted if ip not in remaining), after)

    def conflicting_addresses(self, interface: NetworkInterface, ips: Sequence[str]) -> set[str]:
        reserved = reserved_addresses(interface.subnet_cidr)
        held_twice = {ip for ip in interface.ipv4 if interface.ipv4.count(ip) > 1}
        conflicts = {ip for ip in ips if ip in reserved or ip in held_twice}
        wanted = {ip for ip in ips if ipaddress.ip_address(ip).version == 4} - conflicts
        if wanted:
            # By subnet, not by the `addresses.private-ip-address` filter: the local EC2 matches that
            # filter against primary addresses only.
            neighbours = self._paginate(
                "DescribeNetworkInterfaces",
                "NetworkInterfaces",
                Filters=[{"Name": "subnet-id", "Values": [interface.subnet_id]}],
                MaxResults=self._page_size,
            )
            for raw in neighbours:
                if raw["NetworkInterfaceId"] != interface.id:
                    conflicts.update(
                        a["PrivateIpAddress"]
                        for a in raw.get("PrivateIpAddresses", [])
                        if a["PrivateIpAddress"] in wanted
                    )
        return conflicts

    def list_leaked_interfaces(
        self, older_than_seconds: float, node_instances: Collection[str] | None = None
    ) -> list[NetworkInterface]:
        """Ours, detached past the grace period (an attached one is its instance's, node or not)."""
        raws = self._paginate(
            "DescribeNetworkInterfaces",
            "NetworkInterfaces",
            Filters=[
                {"Name": f"tag:{MANAGED_BY_TAG}", "Values": [MANAGED_BY_VALUE]},
                {"Name": f"tag:{CLUSTER_TAG}", "Values": [self.cluster]},
                {"Name": "status", "Values": ["available"]},
            ],
            MaxResults=self._page_size,
        )
        cutoff = self._clock() - older_than_seconds
        leaked = []
        for interface in self._parse_interfaces(raws):
            created_at = _created_at(interface)
            # No readable creation time: we cannot tell it from one being created right now; spare it.
            if created_at is not None and created_at <= cutoff:
                leaked.append(interface)
        return leaked

    def delete_interface(self, interface_id: str) -> bool:
        try:
            self._call("DeleteNetworkInterface", NetworkInterfaceId=interface_id)
        except NotFound:
            return False
        return True

    def vpc_cidrs(self, vpc_id: str) -> list[str]:
        vpcs = self._call("DescribeVpcs", VpcIds=[vpc_id]).get("Vpcs", [])
        if not vpcs:
            raise NotFound(f"VPC {vpc_id} not found", operation="DescribeVpcs")
        vpc = vpcs[0]
        cidrs = [
            a["CidrBlock"]
            for a in vpc.get("CidrBlockAssociationSet", [])
            if a.get("CidrBlockState", {}).get("State") == "associated"
        ]
        cidrs += [
            a["Ipv6CidrBlock"]
            for a in vpc.get("Ipv6CidrBlockAssociationSet", [])
            if a.get("Ipv6CidrBlockState", {}).get("State") == "associated"
        ]
        return cidrs or ([vpc["CidrBlock"]] if vpc.get("CidrBlock") else [])

    # --- one EC2 call ------------------------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One EC2 operation (e.g. "AssignPrivateIpAddresses"): rate-limited, retried, mapped, observed."""
        method = getattr(self.client, xform_name(operation))  # the boto3 method name
        attempt = 1
        while True:
            self._observer.observe_rate_limit_wait(operation, self.limiter.acquire(operation, params))
            started = time.perf_counter()
            cause: Exception
            try:
                response: dict[str, Any] = method(**params)
            except ClientError as exc:
                cause = exc
                error = _from_client_error(exc, operation)
            except _NETWORK_ERRORS as exc:
                cause = exc
                error = Transient(f"{operation}: {exc}", code=type(exc).__name__, operation=operation)
            else:
                self._observer.observe_api_call(operation, "OK", time.perf_counter() - started)
                return response
            self._observer.observe_api_call(operation, error.code, time.perf_counter() - started)
            if isinstance(error, Throttled):
                self.limiter.throttled(operation, params)
            if attempt >= self._retry.max_attempts or not _retryable(error, operation):
                raise error from cause
            delay = self._retry.delay(attempt)
            log.info("%s failed with %s (attempt %d), retrying in %.2fs", operation, error.code, attempt, delay)
            self._sleep(delay)
            attempt += 1

    def _paginate(self, operation: str, result_key: str, **params: Any) -> list[dict[str, Any]]:
        """Every page of a Describe call; each page is one call through the bucket."""
        items: list[dict[str, Any]] = []
        while True:
            page = self._call(operation, **params)
            items.extend(page.get(result_key, []))
            token = page.get("NextToken")
            if not token:
                return items
            params = {**params, "NextToken": token}

    # --- helpers ------------------------------------------------------------------------------------

    def _read_interface(self, interface_id: str) -> NetworkInterface:
        raws = self._call("DescribeNetworkInterfaces", NetworkInterfaceIds=[interface_id]).get("NetworkInterfaces", [])
        if not raws:
            raise NotFound(f"interface {interface_id} not found", operation="DescribeNetworkInterfaces")
        return self._parse_interfaces(raws)[0]

    def _parse_interfaces(self, raws: list[dict[str, Any]]) -> list[NetworkInterface]:
        cidrs = self._cidrs_of({raw.get("SubnetId", "") for raw in raws} - {""})
        return [
            _parse_interface(raw, *cidrs.get(raw.get("SubnetId", ""), ("", "")), ipv6_gateway=self.ipv6_gateway)
            for raw in raws
        ]

    def _cidrs_of(self, subnet_ids: set[str]) -> dict[str, tuple[str, str]]:
        """Subnet CIDRs per family (the Describe of an interface lacks them), looked up once per subnet."""
        missing = sorted(subnet_ids - self._subnet_cidrs.keys())
        if missing:
            for raw in self._call("DescribeSubnets", SubnetIds=missing).get("Subnets", []):
                self._subnet_cidrs[raw["SubnetId"]] = (raw.get("CidrBlock", ""), subnet_ipv6_block(raw))
        return {s: self._subnet_cidrs.get(s, ("", "")) for s in subnet_ids}

    def _delete_quietly(self, interface_id: str) -> None:
        try:
            self.delete_interface(interface_id)
        except ProviderError as exc:
            # Tagged as ours and detached: the leaked-interface collector deletes it later.
            log.warning("could not delete interface %s after a failed attach: %s", interface_id, exc)


def build_aws_provider(
    *,
    cluster: str,
    region: str,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    qps: float = 4.0,
    burst: int = 20,
    observer: ApiObserver | None = None,
    limiter: Limiter | None = None,
    ipv6_gateway: str = AWS_IPV6_GATEWAY,
) -> AwsProvider:
    """An `AwsProvider` with its own client; its calls go through `limiter`, else a token bucket of
    its own at `qps`/`burst` (Cilium's defaults: 4 QPS, burst 20)."""
    client = make_ec2_client(
        region=region,
        endpoint_url=endpoint_url,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
    )
    return AwsProvider(
        client,
        cluster=cluster,
        limiter=limiter or TokenBucket(qps, burst),
        observer=observer,
        ipv6_gateway=ipv6_gateway,
    )


def from_settings(
    settings: AwsSettings, observer: CloudObserver, *, cluster: str, redis: Redis | RedisCluster
) -> AwsProvider:
    """The worker's AWS provider: EC2's buckets (or the QPS override) kept in `redis` for every
    replica."""
    budget = Ec2Budget(settings.ec2_account_share, qps=settings.ec2_qps, burst=settings.ec2_burst)
    limiter = RedisRateLimiter(redis, budget, scope=f"ec2:{settings.aws_region}", observer=observer)
    return build_aws_provider(
        cluster=cluster,
        region=settings.aws_region,
        endpoint_url=settings.ec2_endpoint_url or None,
        access_key_id=settings.aws_access_key_id.get_secret_value() or None,
        secret_access_key=settings.aws_secret_access_key.get_secret_value() or None,
        qps=settings.ec2_qps,
        burst=settings.ec2_burst,
        observer=observer,
        limiter=limiter,
        ipv6_gateway=settings.ipv6_gateway,
    )


def describe(settings: AwsSettings) -> str:
    """The start-up log's words for this provider: its endpoint and its budget."""
    budget = (
        f"{settings.ec2_qps:.1f} qps, burst {settings.ec2_burst}"
        if settings.ec2_qps > 0
        else f"{settings.ec2_account_share:g} of EC2's request buckets"
    )
    return f"EC2 {settings.ec2_endpoint_url or 'AWS'} in {settings.aws_region}, {budget}"


def _retryable(error: ProviderError, operation: str) -> bool:
    # A transient failure may hide a change that did happen: only reads are safe to repeat.
    return isinstance(error, Throttled) or (isinstance(error, Transient) and is_read(operation))


def _from_client_error(exc: ClientError, operation: str) -> ProviderError:
    error = exc.response.get("Error", {})
    code = error.get("Code", "") or "Unknown"
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400) or 400)
    kind = classify_error(code, status, error.get("Message", ""))
    return kind(f"{operation}: {code}: {error.get('Message', '')}", code=code, operation=operation)


def _parse_instance(raw: dict[str, Any]) -> Instance:
    primary = next(
        (n for n in raw.get("NetworkInterfaces", []) if n.get("Attachment", {}).get("DeviceIndex") == 0),
        {},
    )
    groups = primary.get("Groups") or raw.get("SecurityGroups", [])
    return Instance(
        id=raw["InstanceId"],
        instance_type=raw.get("InstanceType", ""),
        availability_zone=raw.get("Placement", {}).get("AvailabilityZone", ""),
        vpc_id=raw.get("VpcId", ""),
        subnet_id=raw.get("SubnetId", ""),
        security_group_ids=tuple(g["GroupId"] for g in groups),
    )


def _parse_subnet(raw: dict[str, Any]) -> Subnet:
    return Subnet(
        id=raw["SubnetId"],
        vpc_id=raw.get("VpcId", ""),
        availability_zone=raw.get("AvailabilityZone", ""),
        cidr=raw.get("CidrBlock", ""),
        free_addresses=int(raw.get("AvailableIpAddressCount", 0)),
        tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])},
        ipv6_cidr=subnet_ipv6_block(raw),
    )


_IPV6_BLOCK_GONE = frozenset({"disassociating", "disassociated", "failing", "failed"})


def subnet_ipv6_block(raw: dict[str, Any]) -> str:
    """The subnet's IPv6 block (EC2 gives a subnet at most one at a time), "" when it has none."""
    # A block counts unless its state says it is going or gone: the local EC2 writes a subnet's state
    # as the text of a dict ("{'State': 'associated'}"), not as "associated".
    return next(
        (
            a["Ipv6CidrBlock"]
            for a in raw.get("Ipv6CidrBlockAssociationSet", [])
            if a.get("Ipv6CidrBlock") and a.get("Ipv6CidrBlockState", {}).get("State") not in _IPV6_BLOCK_GONE
        ),
        "",
    )


def _parse_interface(
    raw: dict[str, Any], subnet_cidr: str, subnet_ipv6_cidr: str = "", *, ipv6_gateway: str = ""
) -> NetworkInterface:
    attachment = raw.get("Attachment") or {}
    return NetworkInterface(
        id=raw["NetworkInterfaceId"],
        mac=raw.get("MacAddress", ""),
        device_index=int(attachment.get("DeviceIndex", -1)),
        subnet_id=raw.get("SubnetId", ""),
        subnet_cidr=subnet_cidr,
        primary_ip=raw.get("PrivateIpAddress", ""),
        ipv4=tuple(a["PrivateIpAddress"] for a in raw.get("PrivateIpAddresses", []) if not a.get("Primary")),
        ipv6=tuple(str(ipaddress.ip_address(a["Ipv6Address"])) for a in raw.get("Ipv6Addresses", [])),
        security_group_ids=tuple(g["GroupId"] for g in raw.get("Groups", [])),
        status=raw.get("Status", ""),
        tags={t["Key"]: t["Value"] for t in raw.get("TagSet", [])},
        subnet_ipv6_cidr=subnet_ipv6_cidr,
        gateway_ipv6=ipv6_gateway if subnet_ipv6_cidr else "",
        ipv4_prefixes=tuple(p["Ipv4Prefix"] for p in raw.get("Ipv4Prefixes", []) if p.get("Ipv4Prefix")),
        ipv6_prefixes=tuple(
            str(ipaddress.ip_network(p["Ipv6Prefix"], strict=False))
            for p in raw.get("Ipv6Prefixes", [])
            if p.get("Ipv6Prefix")
        ),
    )


def reserved_addresses(cidr: str) -> set[str]:
    """What a VPC subnet never hands out: its network address, the next three and its broadcast."""
    if not cidr:
        return set()
    network = ipaddress.ip_network(cidr, strict=False)
    if network.version != 4 or network.num_addresses < 8:
        return set()
    return {str(network.network_address + i) for i in range(4)} | {str(network.broadcast_address)}


def _addresses(interface: NetworkInterface, family: Family) -> tuple[str, ...]:
    return interface.ipv6 if family is Family.IPV6 else interface.ipv4


def _created_at(interface: NetworkInterface) -> float | None:
    try:
        return float(interface.tags[CREATED_AT_TAG])
    except (KeyError, ValueError):
        return None
