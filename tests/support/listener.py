"""`python -m tests.support.listener`: a stand-in long-running service for the devcluster's tests.

Answers every HTTP GET with 200 on IPAM_METRICS_ADDRESS, and starts a child (`sleep`) in its own
process group, logging `child <pid>`, so that a test can tell whether a whole group was stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(f"replica {os.environ.get('IPAM_REPLICA', '')} pid {os.getpid()}\n".encode())

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    host, _, port = os.environ["IPAM_METRICS_ADDRESS"].rpartition(":")
    server = HTTPServer((host, int(port)), _Ok)
    child = subprocess.Popen(["sleep", "600"])
    print(f"child {child.pid}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        child.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
