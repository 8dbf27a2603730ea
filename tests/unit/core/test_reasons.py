"""The one vocabulary of reasons: wire strings, the empty-pool table, the scripts' failures."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from services.allocator.store import redis_store
from services.core.reasons import BLOCKING_REASONS, POOL_EMPTY_REASONS, DeficitReason, ErrorReason, pool_empty_reason


def test_reasons_are_their_wire_strings() -> None:
    assert DeficitReason.AT_CAPACITY == "at-capacity"
    assert str(DeficitReason.INSTANCE_TYPE_UNKNOWN) == "instance-type-unknown"
    assert f"{ErrorReason.POOL_EMPTY}" == "POOL_EMPTY"
    assert json.dumps([ErrorReason.NODE_AT_CAPACITY]) == '["NODE_AT_CAPACITY"]'


def test_every_blocking_reason_has_an_empty_pool_reason() -> None:
    assert set(POOL_EMPTY_REASONS) == BLOCKING_REASONS


def test_no_blocking_reason_leaves_a_caller_told_a_refill_was_requested() -> None:
    # POOL_EMPTY says "a refill has been requested": a blocked node must never answer it.
    reasons = [POOL_EMPTY_REASONS[r] for r in BLOCKING_REASONS]
    assert ErrorReason.POOL_EMPTY not in reasons and len(set(reasons)) == len(reasons)


@pytest.mark.parametrize(
    "deficit_reason,expected",
    [
        ("at-capacity", "NODE_AT_CAPACITY"),
        ("subnet-full", "SUBNET_FULL"),
        ("instance-type-unknown", "INSTANCE_TYPE_UNKNOWN"),
        ("instance-not-found", "INSTANCE_NOT_FOUND"),
        ("no-instance", "NODE_HAS_NO_INSTANCE"),
        ("max-allocate", "POOL_AT_MAX_ALLOCATE"),
        ("", "POOL_EMPTY"),
        ("nothing-needed", "POOL_EMPTY"),
        ("a-reason-of-a-newer-worker", "POOL_EMPTY"),
    ],
)
def test_pool_empty_reason(deficit_reason: str, expected: str) -> None:
    assert pool_empty_reason(deficit_reason) == expected


@pytest.mark.parametrize(
    "what,expected",
    [
        ("node", "NODE_REQUIRED"),
        ("pool", "POOL_REQUIRED"),
        ("owner", "OWNER_REQUIRED"),
        ("idempotency key", "IDEMPOTENCY_KEY_REQUIRED"),
        ("expiration uuid", "EXPIRATION_UUID_REQUIRED"),
        ("reservation id", "RESERVATION_ID_REQUIRED"),
    ],
)
def test_required_reasons_of_every_validated_field(what: str, expected: str) -> None:
    assert ErrorReason.required(what) == expected


def test_every_script_failure_is_a_reason_the_store_translates() -> None:
    # A failure is `fail('REASON', ...)`, a reason `_lib.lua`'s pool check returns for `fail(missing)`,
    # or the first of a flat answer's values (`{'REASON', ...}`).
    lua = resources.files(redis_store.__package__).joinpath("lua")
    pattern = re.compile(r"""fail\('([A-Z][A-Z0-9_]+)'|return '([A-Z][A-Z0-9_]+)'|\{'([A-Z][A-Z0-9_]+)'""")
    failures = {
        "".join(found)
        for script in lua.iterdir()
        if script.name.endswith(".lua")
        for found in pattern.findall(script.read_text())
    }
    assert {"POOL_EMPTY", "NODE_NOT_FOUND", "POOL_NOT_FOUND"} <= failures
    reasons = {ErrorReason(name) for name in failures}  # ValueError: a failure without a definition
    assert reasons - {ErrorReason.POOL_EMPTY} <= set(redis_store._FAILURES)
