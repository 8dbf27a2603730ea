"""Which nodes the load profiles use: a node the cloud cannot serve is skipped, and why is said."""

from __future__ import annotations

import pytest

from bench.load import not_ready
from ipam.v1 import nodes_pb2 as npb


def _node(deficit_reason: str = "", last_error: str = "", limits: bool = True) -> npb.Node:
    return npb.Node(
        spec=npb.NodeSpec(name="n", instance_id="i-1", instance_type="m5.large"),
        stats=npb.NodeStats(deficit_reason=deficit_reason),
        max_interfaces=3 if limits else 0,
        ipv4_per_interface=10 if limits else 0,
        last_error=last_error,
    )


@pytest.mark.parametrize(
    "node,why",
    [
        (_node(), ""),
        (_node("at-capacity"), ""),  # full, but served: the drain profile expects it
        (_node("instance-not-found", "instance-not-found: instance i-1 not found"), "instance i-1 not found"),
        (_node("instance-type-unknown", limits=False), "instance-type-unknown"),
        (_node(limits=False), "the worker has not reported its instance limits"),
        (_node(last_error="Transient in AssignPrivateIpAddresses: 500"), "last cloud error: Transient"),
    ],
)
def test_not_ready_names_why(node: npb.Node, why: str) -> None:
    assert (not_ready(node) == "") if not why else (why in not_ready(node))
