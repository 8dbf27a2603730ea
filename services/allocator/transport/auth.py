"""Bearer-token access control: the Allocator service needs the client (or admin) role, the
NodeManager service the admin role. Health and reflection stay open for probes and tools."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.core.reasons import ErrorReason

from ..domain.errors import IpamError, PermissionDenied, Unauthenticated
from .status import to_status

log = logging.getLogger(__name__)

CLIENT_SERVICE = "/ipam.v1.Allocator/"
ADMIN_SERVICE = "/ipam.v1.NodeManager/"


def _matches(token: str, allowed: frozenset[str]) -> bool:
    # Compare against every token in constant time; a short-circuit would leak which matched.
    return any([hmac.compare_digest(token.encode(), t.encode()) for t in allowed])


def _bearer(metadata: Any) -> str:
    """The bearer token of a call's metadata ("" without one)."""
    token = ""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            token = value[7:].strip()
    return token


def _refusal(error: IpamError) -> grpc.RpcMethodHandler:
    status = to_status(error)

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` against the configured roles."""

    def __init__(self, client_tokens: frozenset[str], admin_tokens: frozenset[str]) -> None:
        self._client = client_tokens
        self._admin = admin_tokens
        self.enabled = bool(client_tokens or admin_tokens)

    def is_admin(self, metadata: Any) -> bool:
        """Whether a call's metadata carries an admin token (every caller is one when auth is off)."""
        if not self.enabled:
            return True
        return _matches(_bearer(metadata), self._admin)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method or ""
        needs_admin = method.startswith(ADMIN_SERVICE)
        if not self.enabled or not (needs_admin or method.startswith(CLIENT_SERVICE)):
            return await continuation(details)
        token = _bearer(details.invocation_metadata)
        if not token:
            return _refusal(Unauthenticated("a bearer token is required", reason=ErrorReason.MISSING_CREDENTIALS))
        if _matches(token, self._admin):
            return await continuation(details)
        if _matches(token, self._client):
            if needs_admin:
                denied = PermissionDenied(f"{method} needs the admin role", reason=ErrorReason.ADMIN_ROLE_REQUIRED)
                return _refusal(denied)
            return await continuation(details)
        return _refusal(Unauthenticated("the bearer token is not valid", reason=ErrorReason.INVALID_CREDENTIALS))
