"""The one exception tree of ipam. Each error carries a stable `reason` (an ErrorInfo reason on the
wire); the transport layer maps the class to a gRPC status code in exactly one place."""

from __future__ import annotations

from services.core.reasons import ErrorReason


class IpamError(Exception):
    """Base of every error the allocator reports to a caller."""

    reason: str = ErrorReason.INTERNAL

    def __init__(self, message: str, *, reason: str | None = None, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = {k: str(v) for k, v in metadata.items()}


class InvalidArgument(IpamError):
    """Malformed input (bad IP, empty owner, oversized string, negative timeout)."""

    reason = ErrorReason.INVALID_ARGUMENT


class NotFound(IpamError):
    """Unknown node, pool, address, owner or reservation."""

    reason = ErrorReason.NOT_FOUND


class AlreadyExists(IpamError):
    """The address (or node) is already taken."""

    reason = ErrorReason.ALREADY_EXISTS


class IpAlreadyAllocated(AlreadyExists):
    """The address is held; `current_owner` says by whom (the transport shows it to admins only)."""

    reason = ErrorReason.IP_ALREADY_ALLOCATED

    def __init__(self, message: str, *, current_owner: str, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.current_owner = current_owner


class FailedPrecondition(IpamError):
    """Address not in the pool, excluded, reserved, family disabled, timer uuid mismatch."""

    reason = ErrorReason.FAILED_PRECONDITION


class ResourceExhausted(IpamError):
    """The pool has no free address (reason says whether a refill is under way or the node is full)."""

    reason = ErrorReason.POOL_EMPTY


class Unavailable(IpamError):
    """A dependency (Redis) cannot be reached within the call's deadline."""

    reason = ErrorReason.STORE_UNAVAILABLE
    # Set when the call's own deadline ran out: retrying the same call cannot do better.
    final = False


class OutcomeUnknown(IpamError):
    """A change was sent to Redis and no answer came: it may have been applied, or be applied later.

    Not "nothing happened": a retry is safe only with the same idempotency key."""

    reason = ErrorReason.OUTCOME_UNKNOWN


class Unauthenticated(IpamError):
    """No valid credential."""

    reason = ErrorReason.MISSING_CREDENTIALS


class PermissionDenied(IpamError):
    """A credential without the role the call needs."""

    reason = ErrorReason.ADMIN_ROLE_REQUIRED
