"""Server reflection that also answers for method names.

ghz (and other tools) ask for the file containing `ipam.v1.Allocator.Ping`; the stock servicer
only knows message, enum and service names (grpc/grpc#34743), so such a lookup falls back to the
method's service.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import _async, reflection_pb2, reflection_pb2_grpc


class MethodAwareReflection(_async.ReflectionServicer):
    def _file_containing_symbol(self, request: reflection_pb2.ServerReflectionRequest, name: str):  # type: ignore[no-untyped-def]
        try:
            self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service = name.rpartition(".")[0]
            if service:
                try:
                    self._pool.FindServiceByName(service)
                    name = service
                except KeyError:
                    pass
        return super()._file_containing_symbol(request, name)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    servicer = MethodAwareReflection(tuple(service_names), pool=descriptor_pool.Default())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
