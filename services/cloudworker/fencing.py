"""Fencing tokens of the worker's node locks.

A node lock lives in Redis and can be lost with its master in a failover (or expire while its holder
stalls), and then two workers act on one node. Each time a worker takes a node's lock it is issued a
token above every earlier one (`take_token`), which travels with the maintenance (`holding`) and is
sent with each of its changes to the node (`allocator_grpc`); the allocator refuses a change whose
token is below the node's newest (STALE_FENCING_TOKEN) and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from importlib import resources
from typing import Any

from services.core import contract

_TAKE = resources.files(__package__).joinpath("lua/fencing_token.lua").read_text()

# The token of the lock held by the maintenance running in this context; 0 = none.
current_token: ContextVar[int] = ContextVar("ipam_fencing_token", default=0)


async def take_token(client: Any, node: str) -> int:
    """Issues the token of `node`'s lock just taken (0 for a node that does not exist)."""
    return int(await client.eval(_TAKE, 1, contract.node_key(node)))


@contextlib.contextmanager
def holding(token: int) -> Iterator[None]:
    """The allocator calls made within (and in the tasks started within) carry `token`."""
    reset = current_token.set(token)
    try:
        yield
    finally:
        current_token.reset(reset)
