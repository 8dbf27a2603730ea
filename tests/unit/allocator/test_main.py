"""What a `--workers` child's exit code makes the whole allocator's, one case per row."""

from __future__ import annotations

import signal

import pytest

from services.allocator.__main__ import worker_exit_code

SIGTERM, SIGINT, SIGKILL = 128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGKILL

# worker's code, whether we were stopping, the allocator's code
CASES = {
    "stopped as asked": (0, True, 0),
    "killed by our SIGTERM before its own handler was set": (SIGTERM, True, 0),
    "killed by our SIGINT before its own handler was set": (SIGINT, True, 0),
    "failed while stopping": (1, True, 1),
    "killed by another signal while stopping": (SIGKILL, True, SIGKILL),
    "crashed on its own": (1, False, 1),
    "killed on its own": (SIGKILL, False, SIGKILL),
    "ended cleanly on its own: still a failure": (0, False, 1),
    "someone else's SIGTERM to the worker alone": (SIGTERM, False, SIGTERM),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_worker_exit_code(case: tuple[int, bool, int]) -> None:
    code, stopping, expected = case
    assert worker_exit_code(code, stopping=stopping) == expected
