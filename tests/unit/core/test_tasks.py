"""Stopping background tasks that swallow a cancellation (as redis-py does while it connects)."""

from __future__ import annotations

import asyncio

from services.core.tasks import cancel_until_done


async def _loop_swallowing(cancellations: int) -> None:
    """Sleeps in a loop; the first `cancellations` cancels are swallowed."""
    swallowed = 0
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if swallowed >= cancellations:
                raise
            swallowed += 1


async def _stop(cancellations: int, timeout: float) -> tuple[set[asyncio.Task[None]], asyncio.Task[None]]:
    task = asyncio.create_task(_loop_swallowing(cancellations))
    await asyncio.sleep(0)
    left = await cancel_until_done([task], timeout)
    return left, task


def test_a_task_that_swallows_cancellations_is_cancelled_again_until_it_ends() -> None:
    left, task = asyncio.run(_stop(cancellations=3, timeout=5))
    assert left == set() and task.cancelled()


def test_a_task_still_running_at_the_timeout_is_returned() -> None:
    async def scenario() -> bool:
        # About 4 rounds fit in 0.2 s: 20 swallowed cancellations outlast them.
        left, task = await _stop(cancellations=20, timeout=0.2)
        still_running = left == {task} and not task.done()
        await cancel_until_done([task], 10)  # clean up
        return still_running

    assert asyncio.run(scenario())


def test_finished_tasks_are_left_alone() -> None:
    async def scenario() -> set[asyncio.Task[None]]:
        done = asyncio.create_task(asyncio.sleep(0))
        await done
        return await cancel_until_done([done], 1)

    assert asyncio.run(scenario()) == set()
