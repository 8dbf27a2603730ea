"""The errors a cloud provider raises, whatever the cloud. Each kind tells the worker what to do."""

from __future__ import annotations


class ProviderError(Exception):
    """A cloud API call failed. `code` is the cloud's own error code, `operation` the API call."""

    def __init__(self, message: str, *, code: str = "", operation: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.operation = operation


class SubnetFull(ProviderError):
    """The subnet has no free address (or CIDR block) left: try another subnet, or report it."""


class NoPrefixRoom(SubnetFull):
    """The subnet has no free aligned /28 for a prefix (fragmented, or at capacity), though it may
    still have single addresses: try another subnet, else secondary addresses, and prefixes there
    again later."""


class LimitExceeded(ProviderError):
    """An instance or account limit was hit, or a slot we saw free was taken (a device index):
    our view was stale, re-read the truth and replan."""


class Throttled(ProviderError):
    """The cloud rate-limited us; retried with backoff before it reaches the caller."""


class NotFound(ProviderError):
    """The interface, instance, subnet or instance type does not exist."""


class Transient(ProviderError):
    """A server-side or network failure; the same call may succeed later."""
