"""Every reason string of ipam, defined once (no I/O).

`DeficitReason`: why the worker leaves a pool's deficit (or excess) as it is, a planner's or the
maintainer's; the blocking ones are stored on the node and shown as its deficit reason.
`ErrorReason`: the `google.rpc.ErrorInfo` reason of every refused call, the allocator's Lua scripts'
failures among them. Both are str-valued, so they equal, print and serialise as the wire strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class DeficitReason(StrEnum):
    """Why a pool is left as it is."""

    AT_CAPACITY = "at-capacity"  # every interface full and no device slot left
    SUBNET_FULL = "subnet-full"  # room on the instance, none in the subnets it may use
    MAX_ALLOCATE = "max-allocate"  # a deficit remains, but max_allocate forbids more addresses
    # The maintainer's, when the cloud has no limits for the spec's instance type (nothing can be planned).
    INSTANCE_TYPE_UNKNOWN = "instance-type-unknown"
    NOTHING_NEEDED = "nothing-needed"
    NOTHING_RELEASABLE = "nothing-releasable"  # excess, but no interface holds a free address
    # A maintenance refills or gives back, never both: what the other way needs waits for the next one.
    OTHER_WAY_NEXT = "other-way-next"
    NO_INSTANCE = "no-instance"  # the node's spec names no instance id or type yet
    # The maintainer's, when the cloud does not know the spec's instance id (InvalidInstanceID.NotFound).
    INSTANCE_NOT_FOUND = "instance-not-found"
    # The maintainer's, when a node asks for prefix delegation on an instance type that takes no
    # prefixes: not blocking (secondaries are assigned instead), kept as the node's last error.
    PREFIX_DELEGATION_UNSUPPORTED = "prefix-delegation-unsupported"


# The reasons that block a refill: the worker stores them on the node, so that allocations fail at
# once with the matching error reason instead of waiting for addresses that will not come.
BLOCKING_REASONS: frozenset[DeficitReason] = frozenset(
    {
        DeficitReason.AT_CAPACITY,
        DeficitReason.SUBNET_FULL,
        DeficitReason.MAX_ALLOCATE,
        DeficitReason.INSTANCE_TYPE_UNKNOWN,
        DeficitReason.INSTANCE_NOT_FOUND,
        DeficitReason.NO_INSTANCE,
    }
)


class ErrorReason(StrEnum):
    """The ErrorInfo reason of a refused call."""

    # One per exception class: the default reason of each.
    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    POOL_EMPTY = "POOL_EMPTY"  # no free address; a refill has been requested
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"  # the store did not answer; the change provably never reached it
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"  # the change reached the store, no answer came: it may apply
    MISSING_CREDENTIALS = "MISSING_CREDENTIALS"
    ADMIN_ROLE_REQUIRED = "ADMIN_ROLE_REQUIRED"
    # Malformed input.
    INVALID_FAMILY = "INVALID_FAMILY"
    NODE_REQUIRED = "NODE_REQUIRED"
    POOL_REQUIRED = "POOL_REQUIRED"
    OWNER_REQUIRED = "OWNER_REQUIRED"
    IDEMPOTENCY_KEY_REQUIRED = "IDEMPOTENCY_KEY_REQUIRED"
    # An idempotency key already taken by another owner, family or address.
    IDEMPOTENCY_KEY_IN_USE = "IDEMPOTENCY_KEY_IN_USE"
    EXPIRATION_UUID_REQUIRED = "EXPIRATION_UUID_REQUIRED"
    RESERVATION_ID_REQUIRED = "RESERVATION_ID_REQUIRED"
    IP_OR_OWNER_REQUIRED = "IP_OR_OWNER_REQUIRED"
    NAME_TOO_LONG = "NAME_TOO_LONG"
    INVALID_NAME = "INVALID_NAME"
    TEXT_TOO_LONG = "TEXT_TOO_LONG"
    INVALID_TEXT = "INVALID_TEXT"
    INVALID_IP = "INVALID_IP"
    WRONG_FAMILY = "WRONG_FAMILY"
    INVALID_TIMEOUT = "INVALID_TIMEOUT"
    INVALID_SPEC = "INVALID_SPEC"
    INVALID_COUNT = "INVALID_COUNT"
    INVALID_CIDR = "INVALID_CIDR"
    INVALID_FENCING_TOKEN = "INVALID_FENCING_TOKEN"  # past 2^53 (the scripts compare tokens as doubles)
    SPEC_TOO_LARGE = "SPEC_TOO_LARGE"  # a node spec's list or map past its bound
    INVALID_PAGE = "INVALID_PAGE"  # a page size out of range or a page token not ours
    IP_OUTSIDE_VPC = "IP_OUTSIDE_VPC"  # an added address in none of the node's VPC CIDRs of its family
    # An IPv4 prefix that is not a canonical /28 inside its interface's subnet (or has no interface).
    INVALID_PREFIX = "INVALID_PREFIX"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"  # the request's bytes do not decode as its message
    # Credentials.
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    # The server's limits.
    SERVER_OVERLOADED = "SERVER_OVERLOADED"  # past the calls the server takes at once
    # Deadlines.
    DEADLINE_TOO_SHORT = "DEADLINE_TOO_SHORT"
    # The allocator's configuration.
    IPV4_DISABLED = "IPV4_DISABLED"
    IPV6_DISABLED = "IPV6_DISABLED"
    # An empty pool, by why it is empty.
    POOL_COOLING_DOWN = "POOL_COOLING_DOWN"
    NODE_AT_CAPACITY = "NODE_AT_CAPACITY"
    SUBNET_FULL = "SUBNET_FULL"
    INSTANCE_TYPE_UNKNOWN = "INSTANCE_TYPE_UNKNOWN"
    INSTANCE_NOT_FOUND = "INSTANCE_NOT_FOUND"
    NODE_HAS_NO_INSTANCE = "NODE_HAS_NO_INSTANCE"
    POOL_AT_MAX_ALLOCATE = "POOL_AT_MAX_ALLOCATE"  # every address max_allocate allows is attached
    # Failures of the allocator's Lua scripts (`fail(...)` in the scripts).
    NODE_NOT_FOUND = "NODE_NOT_FOUND"
    POOL_NOT_FOUND = "POOL_NOT_FOUND"
    NODE_ALREADY_EXISTS = "NODE_ALREADY_EXISTS"
    IP_ALREADY_ALLOCATED = "IP_ALREADY_ALLOCATED"
    IP_NOT_IN_POOL = "IP_NOT_IN_POOL"
    IP_EXCLUDED = "IP_EXCLUDED"
    IP_RESERVED_FOR_RELEASE = "IP_RESERVED_FOR_RELEASE"
    IP_COOLING_DOWN = "IP_COOLING_DOWN"  # released within the reuse cooldown
    IP_NOT_ALLOCATED = "IP_NOT_ALLOCATED"
    OWNER_NOT_FOUND = "OWNER_NOT_FOUND"
    NO_TIMER_RUNNING = "NO_TIMER_RUNNING"
    EXPIRATION_UUID_MISMATCH = "EXPIRATION_UUID_MISMATCH"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    # A prefix overlapping an address of the pool or a prefix of another interface.
    PREFIX_OVERLAPS = "PREFIX_OVERLAPS"
    PREFIX_NOT_IN_POOL = "PREFIX_NOT_IN_POOL"
    IPV6_PREFIX_HELD = "IPV6_PREFIX_HELD"  # another IPv6 /80 than the one the pool holds
    # A prefix that cannot be reserved for release whole: an address allocated, excluded or reserved;
    # or one released within the reuse cooldown.
    PREFIX_IN_USE = "PREFIX_IN_USE"
    PREFIX_COOLING_DOWN = "PREFIX_COOLING_DOWN"
    # A worker's change with a fencing token below the node's newest: its node lock has passed to
    # another worker (lost in a Redis failover, or expired while it stalled).
    STALE_FENCING_TOKEN = "STALE_FENCING_TOKEN"
    # A script of a call given up (and rolled back) while Redis did not answer; no caller sees it.
    CALL_CANCELLED = "CALL_CANCELLED"

    @classmethod
    def required(cls, what: str) -> ErrorReason:
        """The reason of a missing `what` ("owner" -> OWNER_REQUIRED); only defined ones exist."""
        return cls(f"{what.upper().replace(' ', '_')}_REQUIRED")


# An empty pool's error reason by the node's deficit reason: every blocking reason has its own, so a
# caller (waiting or not) is told at once why no refill will come.
POOL_EMPTY_REASONS: Mapping[DeficitReason, ErrorReason] = MappingProxyType(
    {
        DeficitReason.AT_CAPACITY: ErrorReason.NODE_AT_CAPACITY,
        DeficitReason.SUBNET_FULL: ErrorReason.SUBNET_FULL,
        DeficitReason.INSTANCE_TYPE_UNKNOWN: ErrorReason.INSTANCE_TYPE_UNKNOWN,
        DeficitReason.INSTANCE_NOT_FOUND: ErrorReason.INSTANCE_NOT_FOUND,
        DeficitReason.NO_INSTANCE: ErrorReason.NODE_HAS_NO_INSTANCE,
        DeficitReason.MAX_ALLOCATE: ErrorReason.POOL_AT_MAX_ALLOCATE,
    }
)


def pool_empty_reason(deficit_reason: str) -> ErrorReason:
    """The error reason of an empty pool on a node whose deficit reason is `deficit_reason` ("" = none)."""
    try:
        return POOL_EMPTY_REASONS.get(DeficitReason(deficit_reason), ErrorReason.POOL_EMPTY)
    except ValueError:
        return ErrorReason.POOL_EMPTY
