"""The calls' time limits (`Cutoffs`): what `asyncio.timeout` did for each call, with one loop timer
per 10 ms of limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from services.allocator.transport.cutoffs import SLOT_S, Cutoffs

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Each test on both loops: the server runs on uvloop."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def test_a_block_past_its_limit_ends_in_timeout_error_never_late(run: Run) -> None:
    cutoffs = Cutoffs()

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError), cutoffs.after(0.1):
            await asyncio.sleep(5)
        return time.monotonic() - started

    took = run(main())
    assert 0.1 - SLOT_S - 0.005 <= took <= 0.1 + 0.05
    assert len(cutoffs) == 0


def test_blocks_in_the_same_slot_end_together_each_in_timeout_error(run: Run) -> None:
    cutoffs = Cutoffs()

    async def one() -> str:
        try:
            with cutoffs.after(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timeout"
        return "done"

    async def main() -> list[str]:
        return list(await asyncio.gather(*(one() for _ in range(20))))

    assert run(main()) == ["timeout"] * 20


def test_a_block_within_its_limit_leaves_nothing_behind(run: Run) -> None:
    cutoffs = Cutoffs()

    async def main() -> None:
        with cutoffs.after(0.05):
            await asyncio.sleep(0.01)
        assert len(cutoffs) == 0
        await asyncio.sleep(0.1)  # past the limit: the task is not cancelled afterwards

    run(main())


def test_another_cancellation_stays_a_cancellation(run: Run) -> None:
    cutoffs = Cutoffs()

    async def block() -> None:
        with cutoffs.after(5):
            await asyncio.sleep(5)

    async def main() -> None:
        task = asyncio.create_task(block())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(cutoffs) == 0

    run(main())


def test_no_limit(run: Run) -> None:
    cutoffs = Cutoffs()

    async def main() -> None:
        with cutoffs.after(None):
            assert len(cutoffs) == 0
            await asyncio.sleep(0.01)

    run(main())
