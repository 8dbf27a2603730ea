"""A subnet's IPv6 block as EC2 describes it (no server needed)."""

from __future__ import annotations

import pytest

from services.cloudworker.providers.aws import subnet_ipv6_block


def _subnet(*associations: tuple[str, str]) -> dict[str, object]:
    return {
        "SubnetId": "subnet-1",
        "CidrBlock": "10.0.0.0/18",
        "Ipv6CidrBlockAssociationSet": [
            {"AssociationId": f"a-{i}", "Ipv6CidrBlock": block, "Ipv6CidrBlockState": {"State": state}}
            for i, (block, state) in enumerate(associations)
        ],
    }


@pytest.mark.parametrize(
    ("associations", "block"),
    [
        ((), ""),
        ((("2001:db8:0:1::/64", "associated"),), "2001:db8:0:1::/64"),
        ((("2001:db8:0:1::/64", "associating"),), "2001:db8:0:1::/64"),
        # The local EC2 writes the state as the text of a dict.
        ((("2001:db8:0:1::/64", "{'State': 'associated'}"),), "2001:db8:0:1::/64"),
        ((("2001:db8:0:1::/64", "disassociated"),), ""),
        ((("2001:db8:0:1::/64", "disassociating"),), ""),
        ((("2001:db8:0:1::/64", "failed"),), ""),
        # A block given up and its successor: the successor.
        ((("2001:db8:0:1::/64", "disassociated"), ("2001:db8:0:2::/64", "associated")), "2001:db8:0:2::/64"),
    ],
)
def test_the_subnets_ipv6_block_is_the_one_not_going_or_gone(
    associations: tuple[tuple[str, str], ...], block: str
) -> None:
    assert subnet_ipv6_block(_subnet(*associations)) == block
