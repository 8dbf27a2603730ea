"""What the worker asks of the allocator: the calls the node maintainer makes (AsyncIpamClient
implements them over gRPC; unit tests put a fake behind the same Protocol)."""

from __future__ import annotations

from typing import Protocol

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb


class AllocatorClient(Protocol):
    """The allocator's node and pool calls the maintainer makes."""

    async def get_node(self, name: str, pool: str = "", *, timeout: float | None = None) -> npb.Node: ...

    async def dump(self, node: str, pool: str = "", *, timeout: float | None = None) -> pb.DumpResponse: ...

    async def add_addresses(
        self, request: npb.AddAddressesRequest, *, timeout: float | None = None
    ) -> npb.AddAddressesResponse: ...

    async def set_interfaces(
        self, request: npb.SetInterfacesRequest, *, timeout: float | None = None
    ) -> npb.SetInterfacesResponse: ...

    async def set_node_error(
        self, node: str, error: str, *, timeout: float | None = None
    ) -> npb.SetNodeErrorResponse: ...

    async def remove_addresses(
        self, request: npb.RemoveAddressesRequest, *, timeout: float | None = None
    ) -> npb.RemoveAddressesResponse: ...

    async def reserve_for_release(
        self, request: npb.ReserveForReleaseRequest, *, timeout: float | None = None
    ) -> npb.ReserveForReleaseResponse: ...

    async def complete_release(
        self, request: npb.CompleteReleaseRequest, *, timeout: float | None = None
    ) -> npb.CompleteReleaseResponse: ...

    async def abort_release(
        self, request: npb.AbortReleaseRequest, *, timeout: float | None = None
    ) -> npb.AbortReleaseResponse: ...
