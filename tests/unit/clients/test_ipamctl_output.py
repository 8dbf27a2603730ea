"""Pure parts of ipamctl: tables, error lines, dump and node rendering, argument checking."""

from __future__ import annotations

import grpc
import pytest

from clients.client import IpamClientError
from clients.ipamctl import (
    build_parser,
    format_allocation,
    format_dump,
    format_error_line,
    format_node,
    format_nodes_table,
    format_status,
    format_table,
    main,
)
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as nodes_pb


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    table = format_table(["NAME", "USED"], [["a", 5], ["node-long", 120]])
    assert table.splitlines() == [
        "NAME       USED",
        "a             5",
        "node-long   120",
    ]


def test_format_table_without_rows_is_the_header() -> None:
    assert format_table(["NAME", "USED"], []) == "NAME  USED"


def _node(name: str, instance_type: str, used: int, available: int, needed: int, excess: int) -> nodes_pb.Node:
    return nodes_pb.Node(
        spec=nodes_pb.NodeSpec(name=name, instance_type=instance_type),
        stats=nodes_pb.NodeStats(used_ips=used, available_ips=available, needed_ips=needed, excess_ips=excess),
    )


def test_nodes_table_keeps_the_servers_watermark_order() -> None:
    nodes = [_node("n2", "m5.large", 12, 14, 6, 0), _node("n1", "", 1, 120, 0, 100)]
    assert format_nodes_table(nodes).splitlines() == [
        "NAME  INSTANCE TYPE  USED  FREE  AVAILABLE  NEEDED  EXCESS",
        "n2    m5.large         12     2         14       6       0",
        "n1    -                 1   119        120       0     100",
    ]


def test_nodes_table_when_there_are_none() -> None:
    assert format_nodes_table([]) == "no nodes"


def test_error_line() -> None:
    error = IpamClientError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EMPTY", "pool default of node n1 has no free IPv4 address"
    )
    assert (
        format_error_line(error)
        == "ipamctl: RESOURCE_EXHAUSTED POOL_EMPTY: pool default of node n1 has no free IPv4 address"
    )
    assert format_error_line("two\nlines") == "ipamctl: two lines"


def test_dump_sorts_by_address_and_ends_with_the_status() -> None:
    response = pb.DumpResponse(
        ipv4={"10.0.0.10": "b", "10.0.0.9": "a"}, ipv6={"2001:db8::1": "c"}, status="3 allocated"
    )
    assert format_dump(response).splitlines() == [
        "IP           OWNER",
        "10.0.0.9     a",
        "10.0.0.10    b",
        "2001:db8::1  c",
        "",
        "3 allocated",
    ]
    assert format_dump(pb.DumpResponse()) == "no allocations"


def test_dump_shows_each_familys_subnet_and_gateway() -> None:
    response = pb.DumpResponse(
        ipv4={"10.0.0.9": "a"},
        ipv6={"2001:db8::9": "a"},
        subnets=[
            pb.PoolSubnet(family=pb.FAMILY_IPV4, cidr="10.0.0.0/18", gateway_ip="10.0.0.1", interface_ids=["eni-1"]),
            pb.PoolSubnet(
                family=pb.FAMILY_IPV6, cidr="2001:db8::/64", gateway_ip="fe80:ec2::1", interface_ids=["eni-1"]
            ),
        ],
    )
    assert format_dump(response).splitlines()[4:] == [
        "FAMILY  SUBNET         GATEWAY      INTERFACES",
        "ipv4    10.0.0.0/18    10.0.0.1     eni-1",
        "ipv6    2001:db8::/64  fe80:ec2::1  eni-1",
    ]


def test_allocation_and_node_show_each_familys_subnet_and_gateway() -> None:
    v6 = pb.AllocationResult(ip="2001:db8::9", subnet_cidr="2001:db8::/64", gateway_ip="fe80:ec2::1")
    lines = format_allocation(v6).splitlines()
    assert [line.split() for line in lines[1:]] == [["subnet", "2001:db8::/64"], ["gateway", "fe80:ec2::1"]]
    node = nodes_pb.Node(
        spec=nodes_pb.NodeSpec(name="n1"),
        interfaces=[
            nodes_pb.Interface(
                id="eni-1",
                subnet_id="subnet-1",
                subnet_cidr="10.0.0.0/18",
                gateway_ip="10.0.0.1",
                subnet_ipv6_cidr="2001:db8::/64",
                gateway_ipv6="fe80:ec2::1",
            )
        ],
    )
    header, row = format_node(node).splitlines()[-2:]
    assert header.split()[3:7] == ["IPV4", "CIDR", "IPV4", "GATEWAY"]
    assert row.split()[3:7] == ["10.0.0.0/18", "10.0.0.1", "2001:db8::/64", "fe80:ec2::1"]


def test_node_show_and_dump_list_the_prefixes_and_their_use() -> None:
    use = pb.PrefixUse(prefix="10.0.1.16/28", interface_id="eni-1", free=9, cooling=1, allocated=5, excluded=1)
    node = nodes_pb.Node(
        spec=nodes_pb.NodeSpec(name="n1"),
        interfaces=[nodes_pb.Interface(id="eni-1", mac="m", ipv4_prefixes=["10.0.1.16/28"])],
        stats=nodes_pb.NodeStats(max_allocatable_ipv4=432, ipv4_prefixes=1),
        prefixes=[use],
    )
    lines = format_node(node).splitlines()
    assert ["max", "allocatable", "ipv4", "432"] in [line.split() for line in lines]
    assert lines[-5].split()[-2:] == ["ADDRESSES", "PREFIXES"] and lines[-4].split()[-1] == "1"
    assert lines[-3] == "prefixes"
    assert [line.split() for line in lines[-2:]] == [
        ["PREFIX", "INTERFACE", "FREE", "COOLING", "ALLOCATED", "EXCLUDED", "RESERVED"],
        ["10.0.1.16/28", "eni-1", "9", "1", "5", "1", "0"],
    ]
    assert format_dump(pb.DumpResponse(prefixes=[use])).splitlines()[-1].split()[:3] == ["10.0.1.16/28", "eni-1", "9"]


def test_json_flag_is_accepted_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--json", "dump", "n1"]).json
    assert parser.parse_args(["dump", "n1", "--json"]).json
    assert not parser.parse_args(["dump", "n1"]).json


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["release", "n1"],
        ["release", "n1", "--ip", "10.0.0.1", "--owner", "o"],
        ["allocate", "n1"],
        ["allocate", "n1", "--owner", "o", "--family", "ipv5"],
        ["node"],
        ["node", "create", "n1", "--instance-id", "i-1", "--instance-type", "m5.large", "--subnet-tag", "x"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_contradicting_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before any call is made, so no server is needed.
    assert main(["allocate", "n1", "--owner", "o", "--ip", "10.0.0.1", "--wait"]) == 2
    assert capsys.readouterr().err == "ipamctl: allocate --ip does not take --wait\n"


def test_bad_address_list_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", "a:1,b:2", "ping"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ipamctl: ") and err.count("\n") == 1


def _redis(mode: str = "single", replicas: int = 0, in_sync: int = 0, min_replicas: int = 0) -> dict[str, object]:
    master = "" if mode == "cluster" else "127.0.0.1:6379"
    masters = 3 if mode == "cluster" else 1
    return {
        "mode": mode,
        "master": master,
        "masters": masters,
        "replicas": replicas,
        "replicas_in_sync": in_sync,
        "min_replicas": min_replicas,
    }


def _status(*workers: dict[str, object], redis: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "allocators": [],
        "redis": redis or _redis(),
        "workers": list(workers),
        "nodes": {"total": 0, "ok": 0, "in-deficit": 0, "at-capacity": 0, "excess": 0},
        "events": {"pending": 0, "dead": 0},
    }


def test_status_shows_workers_by_their_heartbeat() -> None:
    alive = {"name": "w-1", "alive": True, "heartbeat_expires_in_ms": 12_400, "pending": 0}
    dead = {"name": "w-2", "alive": False, "heartbeat_expires_in_ms": 0, "pending": 3}
    lines = format_status(_status(alive, dead), []).splitlines()
    assert "  w-1                      alive (heartbeat good for 12 s more), 0 taken" in lines
    assert "  w-2                      gone (another worker claims what it took), 3 taken" in lines
    assert not any("none alive" in line for line in lines)
    assert "  none alive: pools are not refilled" in format_status(_status(dead), []).splitlines()


def test_status_says_where_the_allocator_writes_and_whether_replicas_hold_it() -> None:
    def line(**redis: object) -> str:
        return next(x for x in format_status(_status(redis=_redis(**redis)), []).splitlines() if x.startswith("redis"))

    assert line() == "redis  single, master 127.0.0.1:6379: 0 replicas (0 in sync)"
    assert line(mode="sentinel", replicas=1, in_sync=1, min_replicas=1) == (
        "redis  sentinel, master 127.0.0.1:6379: 1 replicas (1 in sync); a change is answered once 1 hold it"
    )
    assert line(mode="sentinel", replicas=1, in_sync=0, min_replicas=1).endswith(
        ": too few in sync, changes answer OUTCOME_UNKNOWN"
    )
    assert line(mode="cluster", replicas=1, in_sync=1) == (
        "redis  cluster, 3 masters: 1 replicas (1 in sync, the fewest of any master)"
    )


def test_status_names_a_node_that_asked_for_prefixes_its_type_cannot_take() -> None:
    node = _node("node-c4", "c4.large", 2, 10, 0, 0)
    node.last_error = "prefix-delegation-unsupported: c4.large takes no prefixes (not a Nitro instance type)"
    lines = format_status(_status(), [node]).splitlines()
    assert f"  node-c4                  ok, but {node.last_error}" in lines
