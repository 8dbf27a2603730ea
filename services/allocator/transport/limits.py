"""The server's own limits, applied to every call before its handler runs: load shedding with a
reason (health and reflection exempt, so a busy server still answers its probes) and requests whose
bytes do not decode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.core.reasons import ErrorReason

from ..domain.errors import InvalidArgument, ResourceExhausted
from .status import to_status

# Calls to these services count against the limit; the others (health, reflection) never do.
LIMITED_PREFIX = "/ipam.v1."

_UNDECODABLE = object()  # what the guarded deserializer hands on for bytes that are not the message


class ServerGuard(grpc.aio.ServerInterceptor):
    """Sheds calls past `max_in_flight` (0 = no limit) with RESOURCE_EXHAUSTED SERVER_OVERLOADED, and
    answers undecodable requests with INVALID_ARGUMENT MALFORMED_REQUEST instead of an UNKNOWN that
    names an exception class. Replaces gRPC's own `maximum_concurrent_rpcs`, which sheds health
    checks too and gives no reason."""

    def __init__(self, max_in_flight: int = 0) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._overloaded = to_status(
            ResourceExhausted(
                f"the server is at its limit of {max_in_flight} calls in flight; retry with backoff",
                reason=ErrorReason.SERVER_OVERLOADED,
            )
        )
        self._malformed = to_status(
            InvalidArgument("the request does not decode as the method's message", reason=ErrorReason.MALFORMED_REQUEST)
        )
        # Per method, the handler last seen and its guarded form: the server hands out the same handler
        # object for every call of a method, so the guarded one is built once, not on every call.
        self._guarded_handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming calls (health Watch, reflection) as they are
        method = details.method or ""
        cached = self._guarded_handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        limited = self.max_in_flight > 0 and method.startswith(LIMITED_PREFIX)
        guarded = grpc.unary_unary_rpc_method_handler(
            self._guarded(handler.unary_unary, limited),
            request_deserializer=_guarded_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._guarded_handlers[method] = (handler, guarded)
        return guarded

    def _guarded(self, behaviour: Callable[..., Any], limited: bool) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _UNDECODABLE:
                return _answer(context, self._malformed)
            if not limited:
                return await behaviour(request, context)
            if self.in_flight >= self.max_in_flight:
                return _answer(context, self._overloaded)
            self.in_flight += 1
            try:
                return await behaviour(request, context)
            finally:
                self.in_flight -= 1

        return guarded


def _answer(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """Ends the call with `status` as a handler's return does: an abort this early (before the
    handler ran) reaches some clients as CANCELLED without a reason under load."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def _guarded_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def guarded(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except DecodeError:
            return _UNDECODABLE

    return guarded
