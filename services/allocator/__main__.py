"""`ipam-allocator`: the gRPC allocator. `--workers N` forks N processes sharing the port."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys

import uvloop

from .app import serve
from .settings import AllocatorSettings

log = logging.getLogger("ipam.allocator")


def _run_one(settings: AllocatorSettings, index: int) -> None:
    # Objects alive at start-up (modules, descriptors) never become garbage: keep them out of every
    # collection. The thresholds stay Python's: grpc.aio leaves a few objects of cyclic garbage per
    # call (a closure of its method lookup), so a larger young generation only makes each pause
    # longer (20,000 objects: 6-10 ms pauses, seen in the p99).
    gc.freeze()
    uvloop.run(serve(settings, worker_index=index))


def main(argv: list[str] | None = None) -> None:
    settings = AllocatorSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers <= 1:
        _run_one(settings, 0)
        return
    sys.exit(_supervise(settings))


def _supervise(settings: AllocatorSettings) -> int:
    """Forks the workers and waits for them; returns the exit code of the whole.

    A worker that ends before it was asked to (it crashed, or could not start: its metrics port
    taken) takes the others down with it and the exit code is not 0, so that whoever runs the
    allocator (systemd, Docker, Kubernetes) sees it and restarts it, rather than a half of it
    serving on unnoticed.
    """
    # Fork before any server or event loop exists; the kernel balances connections (SO_REUSEPORT).
    children: dict[int, int] = {}  # pid -> worker index
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            os._exit(_child(settings, index))
        children[pid] = index

    stopping = False

    def forward(signum: int, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code < 0:  # killed by a signal: the shell's convention, 128 + its number
            code = 128 - code
        if not stopping:
            log.error("allocator worker %d (pid %d) ended on its own (exit %d): stopping the others", index, pid, code)
            forward(signal.SIGTERM)
        exit_code = exit_code or worker_exit_code(code, stopping=stopping)
    return exit_code


def worker_exit_code(code: int, *, stopping: bool) -> int:
    """What one worker's exit code (128 + n for signal n) makes the whole allocator's: 0 only for a
    stop that was asked for, also when our SIGTERM came before the worker had its own handler."""
    if stopping:
        return 0 if code in (128 + signal.SIGTERM, 128 + signal.SIGINT) else code
    return code or 1  # ending on its own is a failure, whatever it said


def _child(settings: AllocatorSettings, index: int) -> int:
    """One forked worker; its exit code (a failure is logged here: a forked child has no other voice)."""
    try:
        _run_one(settings, index)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # noqa: BLE001 - anything that ends a worker must be seen and counted
        log.exception("allocator worker %d failed", index)
        return 1
    return 0


if __name__ == "__main__":
    main()
