"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> set[asyncio.Task[Any]]:
    """Cancels the tasks until each has ended, for at most `timeout` seconds; returns those still running.

    One cancel is not always enough: redis-py swallows a cancellation that lands while it connects,
    and a loop that swallowed it carries on (a shutdown waiting for it, or asyncio's own clean-up of
    the tasks left, then waits forever). A loop always gets to another await soon, where the next
    cancel ends it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {task for task in tasks if not task.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)
    return pending
