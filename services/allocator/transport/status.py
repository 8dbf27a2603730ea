"""The one place where domain errors become gRPC statuses (code + google.rpc.ErrorInfo reason)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain import errors

DOMAIN = "ipam.v1"

_CODES: dict[type[errors.IpamError], tuple[grpc.StatusCode, int]] = {
    errors.InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    errors.NotFound: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    errors.AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
    errors.FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    errors.ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    errors.Unavailable: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    # Not UNAVAILABLE, which clients retry as "nothing happened": ABORTED = retry at a higher level
    # (with the same idempotency key).
    errors.OutcomeUnknown: (grpc.StatusCode.ABORTED, code_pb2.ABORTED),
    errors.Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    errors.PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
}


def status_code_of(error: errors.IpamError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls][0]
    return grpc.StatusCode.INTERNAL


def to_status(error: errors.IpamError) -> grpc.Status:
    """A gRPC status carrying the error's stable reason as an ErrorInfo detail."""
    code = code_pb2.INTERNAL
    for cls in type(error).__mro__:
        if cls in _CODES:
            code = _CODES[cls][1]
            break
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))
    status = rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=[detail]))
    if isinstance(error, errors.Unavailable) and error.final:
        # gRPC's client-side retry stops on a negative pushback, so the caller gets this answer
        # instead of a bare DEADLINE_EXCEEDED from a retry that had no time left.
        metadata = (*status.trailing_metadata, ("grpc-retry-pushback-ms", "-1"))
        status = _Status(status.code, status.details, metadata)
    return status


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
