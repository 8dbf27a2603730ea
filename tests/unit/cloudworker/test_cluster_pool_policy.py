"""The cluster pool's choices, table-tested: blocks of 16 on the node's virtual interfaces, one per
cluster CIDR; whole free blocks back, the highest first."""

from __future__ import annotations

import ipaddress

import pytest

from services.cloudworker.model import (
    AllocationAction,
    InstanceLimits,
    NetworkInterface,
    NoAction,
    NodeSpec,
    ReleaseAction,
    Subnet,
    prefix_addresses,
)
from services.cloudworker.providers.cluster_pool import ClusterPoolPolicy
from services.core.family import Family
from services.core.reasons import DeficitReason

A, B = "10.128.0.0/24", "10.129.0.0/24"
POLICY = ClusterPoolPolicy([ipaddress.IPv4Network(A), ipaddress.IPv4Network(B)])
LIMITS = InstanceLimits(max_interfaces=2, ipv4_per_interface=4 + 1, prefix_capable=True)  # 4 blocks per CIDR


def subnets(free_a: int = 15, free_b: int = 15) -> list[Subnet]:
    return [Subnet(A, "c", "", A, free_a * 16), Subnet(B, "c", "", B, free_b * 16)]


def interface(cidr: str, *blocks: int) -> NetworkInterface:
    base = ipaddress.IPv4Network(cidr).network_address
    prefixes = tuple(f"{base + 16 * b}/28" for b in blocks)
    return NetworkInterface(f"cp{[A, B].index(cidr)}-n", "", [A, B].index(cidr), cidr, cidr, "", ipv4_prefixes=prefixes)


@pytest.mark.parametrize(
    ("wanted", "interfaces", "free", "spec", "expected"),
    [
        # ⌈wanted / 16⌉ blocks on a new interface of the first CIDR.
        (20, [], subnets(), NodeSpec(), AllocationAction(0, A, 0, prefixes=2)),
        # On the interface the node has, up to its room.
        (100, [interface(A, 1, 2)], subnets(), NodeSpec(), AllocationAction(0, A, 0, "cp0-n", prefixes=2)),
        # Its interface full: the next CIDR.
        (1, [interface(A, 1, 2, 3, 4)], subnets(), NodeSpec(), AllocationAction(0, B, 1, prefixes=1)),
        # No more than the CIDR's free blocks.
        (64, [], subnets(free_a=3), NodeSpec(), AllocationAction(0, A, 0, prefixes=3)),
        # A CIDR without a free block: the next.
        (1, [interface(A, 1)], subnets(free_a=0), NodeSpec(), AllocationAction(0, B, 1, prefixes=1)),
        # The spec's subnet ids name the CIDRs the node may use.
        (1, [], subnets(), NodeSpec(subnet_ids=(B,)), AllocationAction(0, B, 1, prefixes=1)),
        (1, [], subnets(free_a=0, free_b=0), NodeSpec(), NoAction(DeficitReason.SUBNET_FULL)),
        (
            1,
            [interface(A, 1, 2, 3, 4), interface(B, 1, 2, 3, 4)],
            subnets(),
            NodeSpec(),
            NoAction(DeficitReason.AT_CAPACITY),
        ),
    ],
)
def test_allocation(
    wanted: int, interfaces: list[NetworkInterface], free: list[Subnet], spec: NodeSpec, expected: object
) -> None:
    action = POLICY.prepare_allocation(spec, wanted, interfaces, LIMITS, free)
    if isinstance(expected, NoAction):
        assert isinstance(action, NoAction) and action.reason == expected.reason
    else:
        assert action == expected


def free_of(*blocks: tuple[str, int]) -> set[str]:
    return {
        a for cidr, b in blocks for a in prefix_addresses(f"{ipaddress.IPv4Network(cidr).network_address + 16 * b}/28")
    }


@pytest.mark.parametrize(
    ("excess", "free", "expected"),
    [
        # The highest whole free block.
        (16, free_of((A, 1), (A, 2)), ReleaseAction("cp0-n", A, 16, Family.IPV4, prefix="10.128.0.32/28")),
        # One address of block 2 in use: block 1.
        (40, free_of((A, 1), (A, 2)) - {"10.128.0.33"}, ReleaseAction("cp0-n", A, 16, prefix="10.128.0.16/28")),
        # Below a block in excess: none (the node would drop below its watermark).
        (15, free_of((A, 1), (A, 2)), None),
        (16, free_of((A, 1)) - {"10.128.0.20"}, None),
    ],
)
def test_release(excess: int, free: set[str], expected: ReleaseAction | None) -> None:
    action = POLICY.prepare_release(NodeSpec(), [interface(A, 1, 2)], free, excess, Family.IPV4)
    if expected is None:
        assert isinstance(action, NoAction) and action.reason == DeficitReason.NOTHING_RELEASABLE
    else:
        assert action == expected


def test_no_ipv6() -> None:
    assert POLICY.prepare_ipv6_allocation(NodeSpec(), [interface(A, 1)], LIMITS, 4) is None
