"""`ipam-cloudworker`: resolves pool deficits and excess against the cloud."""

from __future__ import annotations

import logging
import sys

import uvloop

from .app import run
from .settings import WorkerSettings


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
