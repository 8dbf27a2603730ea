"""`python -m dev.local_ec2`: the local EC2 (the moto server) that keeps its state across restarts.

It hands out addresses as EC2 does, from one address map per subnet, and delegates prefixes
(`dev/ec2/addressing.py`).

The moto server holds everything in memory. With `--state-file`, it records every request it
serves (moto's recorder) into that file, and on start replays the file before it opens its port,
with moto's random generator seeded the same way (`--seed`) as when the requests were first
served: instance, interface and address ids come out the same, so the pools kept in Redis still
match the cloud after a restart.

What makes the replay exact: requests are processed one at a time (moto's own server processes
them in threads at once, so ids drawn by two requests could be drawn in another order on replay), the
replay runs in-process before the port is open (nothing can interleave), and the seed is set
before the first request of a fresh file and before its replay. Delete the file to start afresh.
The file grows with every request (Describe calls included), and so does the start-up time: the
e2e test's 485 requests (2,000 allocations' refills) took 20 s to replay on a busy 2-CPU machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dev.ec2 import CAPACITY_ERRORS

log = logging.getLogger("ipam.local_ec2")

# Requests that change nothing and draw no ids: the health checks' GET /moto-api/ and the like.
_SKIPPED_ON_REPLAY = ("/moto-api/",)


def _kept(entry: dict[str, Any]) -> bool:
    path = urlsplit(entry.get("url", "")).path
    return not (entry.get("method") == "GET" and path in _SKIPPED_ON_REPLAY)


def read_recording(path: Path) -> list[dict[str, Any]]:
    """The recorded requests worth replaying; a line cut off by a crash mid-write is dropped."""
    entries = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and _kept(entry):
                entries.append(entry)
    return entries


def replay(app: Any, entries: list[dict[str, Any]]) -> int:
    """Serves each recorded request again, in order, through the WSGI app itself; returns how many."""
    from werkzeug.test import Client

    client = Client(app)
    for entry in entries:
        url = urlsplit(entry["url"])
        body: Any = entry.get("body") or b""
        if entry.get("body_encoded"):
            body = base64.b64decode(body)
        headers = {k: v for k, v in (entry.get("headers") or {}).items() if k.lower() != "transfer-encoding"}
        client.open(
            url.path,
            base_url=f"{url.scheme}://{url.netloc}",
            query_string=url.query,
            method=entry.get("method", "GET"),
            headers=headers,
            data=body,
        )
    return len(entries)


class Serialized:
    """A WSGI app that processes one request at a time (connections are still served in threads):
    the order requests are recorded in is the order they drew their random ids in."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.lock:
            # The body is produced inside the lock too: moto answers with a finished body.
            return list(self.app(environ, start_response))


class SettingsEndpoint:
    """A WSGI app that serves `POST /local-ec2/settings` itself and passes every other request to
    moto's. The body is a JSON object of settings to change, so far `prefix_capacity_error` (the code
    answered when a subnet has too few free prefixes). Settings are not recorded: a restart starts
    from the command line's."""

    PATH = "/local-ec2/settings"

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != self.PATH:
            return self.app(environ, start_response)
        from dev.ec2.addressing import set_capacity_error

        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            settings = json.loads(environ["wsgi.input"].read(length) or b"{}")
            if environ.get("REQUEST_METHOD") != "POST" or not isinstance(settings, dict):
                raise ValueError("POST a JSON object of settings")
            if unknown := set(settings) - {"prefix_capacity_error"}:
                raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
            if "prefix_capacity_error" in settings:
                set_capacity_error(settings["prefix_capacity_error"])
        except ValueError as exc:  # json's errors are ValueErrors too
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [str(exc).encode()]
        start_response("204 No Content", [])
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("-p", "--port", type=int, default=5000, help="port (default %(default)s)")
    parser.add_argument(
        "--state-file",
        type=Path,
        default=Path(os.environ["IPAM_EC2_STATE_FILE"]) if os.environ.get("IPAM_EC2_STATE_FILE") else None,
        help="record requests here and replay them on start (env IPAM_EC2_STATE_FILE; default: keep nothing)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of moto's random generator (default %(default)s)")
    parser.add_argument(
        "--prefix-capacity-error",
        choices=CAPACITY_ERRORS,
        default=os.environ.get("IPAM_EC2_PREFIX_CAPACITY_ERROR") or CAPACITY_ERRORS[0],
        help="the error answered when a subnet has too few free prefixes: EC2 answers either"
        f" (env IPAM_EC2_PREFIX_CAPACITY_ERROR; POST {SettingsEndpoint.PATH} changes it; default %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.state_file is not None:
        args.state_file.parent.mkdir(parents=True, exist_ok=True)
        # moto's recorder reads these when it is imported.
        os.environ["MOTO_RECORDER_FILEPATH"] = str(args.state_file)
        os.environ["MOTO_ENABLE_RECORDING"] = "true"
    os.environ.setdefault("MOTO_PORT", str(args.port))

    from moto.moto_api import recorder
    from moto.moto_api._internal import mock_random
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    from dev.ec2.addressing import install

    install(args.prefix_capacity_error)
    app = DomainDispatcherApplication(create_backend_app)
    mock_random.seed(args.seed)
    if args.state_file is not None:
        entries = read_recording(args.state_file)
        started = time.monotonic()
        recorder.stop_recording()
        replayed = replay(app, entries)
        recorder.start_recording()
        # Rewritten without what the replay skips, so the file does not grow with health checks.
        args.state_file.write_text("".join(json.dumps(e) + "\n" for e in entries))
        log.info(
            "local EC2: replayed %d recorded requests from %s in %.1f s; recording to it",
            replayed,
            args.state_file,
            time.monotonic() - started,
        )
    else:
        log.info("local EC2: no --state-file, nothing is kept across restarts")

    # Straight out: each recorded request is on disk once served, and tearing down moto's modules at
    # the interpreter's exit took 2-3 s on a busy machine (every stop of `make run` or a test waited).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    run_simple(
        args.host, args.port, Serialized(SettingsEndpoint(app)), threaded=True, request_handler=MotoRequestHandler
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
