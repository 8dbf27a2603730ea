"""An HTTP proxy in front of the moto server that answers some EC2 calls with faults, for tests
whose EC2 client lives in another process (botocore's event hooks reach only our own clients).

Per call, by chance: throttled (503 RequestLimitExceeded, not forwarded), a clean 500 (not
forwarded), or carried out and then answered with a 500 (forwarded, its answer thrown away), at a
rate of its own for calls that assign or unassign prefixes.
And on demand: calls of one action held, not forwarded, until released (`hold`, `release`).
"""

from __future__ import annotations

import http.client
import random
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
)


@dataclass
class FaultRates:
    """Chances per call (0..1); `after_call` only for calls that change something, `prefix_after_call`
    (when set) instead of it for those that name prefixes (Ipv4Prefix*, Ipv6Prefix*)."""

    throttle: float = 0.0
    error: float = 0.0
    after_call: float = 0.0
    prefix_after_call: float | None = None


class Ec2FaultProxy:
    """Listens on a free loopback port; `endpoint_url` is what the worker is given."""

    def __init__(self, upstream_url: str, seed: int) -> None:
        upstream = urllib.parse.urlsplit(upstream_url)
        self.upstream = (upstream.hostname or "127.0.0.1", upstream.port or 80)
        self.rates = FaultRates()
        self.counts: dict[str, int] = {"throttle": 0, "error": 0, "after_call": 0, "forwarded": 0}
        self.prefix_after_calls = 0  # of the after_call faults, those of prefix calls
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._held_action = ""
        self._gate = threading.Event()
        self.held = 0  # calls waiting at the gate now
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy._wait_if_held(body)
                fault = proxy._choose(body)
                if fault == "throttle":
                    return self._answer(
                        503, _ERROR.format(code="RequestLimitExceeded", message="Request limit exceeded.")
                    )
                if fault == "error":
                    return self._answer(500, _ERROR.format(code="InternalError", message="An internal error occurred."))
                status, headers, payload = proxy._forward(self.command, self.path, dict(self.headers), body)
                if fault == "after_call":
                    return self._answer(500, _ERROR.format(code="InternalError", message="An internal error occurred."))
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST  # noqa: N815

            def _answer(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def hold(self, action: str) -> None:
        """Calls of `action` from now on wait, not forwarded, until `release`."""
        self._gate.clear()
        self._held_action = action

    def release(self) -> None:
        """Forwards the calls held, and holds no more."""
        self._held_action = ""
        self._gate.set()

    def _wait_if_held(self, body: bytes) -> None:
        if not self._held_action or _action(body) != self._held_action:
            return
        with self._lock:
            self.held += 1
        self._gate.wait(timeout=60)
        with self._lock:
            self.held -= 1

    def _choose(self, body: bytes) -> str:
        action = _action(body)
        mutating = not action.startswith("Describe")
        prefixes = mutating and (b"Ipv4Prefix" in body or b"Ipv6Prefix" in body)
        with self._lock:
            roll = self._random.random()
            r = self.rates
            after_call = r.prefix_after_call if prefixes and r.prefix_after_call is not None else r.after_call
            if roll < r.throttle:
                fault = "throttle"
            elif roll < r.throttle + r.error:
                fault = "error"
            elif mutating and roll < r.throttle + r.error + after_call:
                fault = "after_call"
                self.prefix_after_calls += prefixes
            else:
                fault = "forwarded"
            self.counts[fault] += 1
        return fault

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:  # type: ignore[type-arg]
        connection = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
            connection.request(method, path, body=body, headers=headers)
            reply = connection.getresponse()
            return reply.status, reply.getheaders(), reply.read()
        finally:
            connection.close()

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _action(body: bytes) -> str:
    return urllib.parse.parse_qs(body.decode(errors="replace")).get("Action", [""])[0]
