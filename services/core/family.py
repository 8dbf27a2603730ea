"""Address families (no I/O)."""

from __future__ import annotations

from enum import IntEnum


class Family(IntEnum):
    """Address family; values match `ipam.v1.Family`."""

    UNSPECIFIED = 0
    IPV4 = 1
    IPV6 = 2

    @property
    def tag(self) -> str:
        """The short form used in Redis keys: "4" or "6"."""
        return "4" if self is Family.IPV4 else "6"
