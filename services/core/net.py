"""Address strings (no I/O)."""

from __future__ import annotations


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port); an empty host means every interface."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
