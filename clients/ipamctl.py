"""ipamctl: the command line over the Python client of the ipam allocator.

    ipamctl allocate node-a --owner pod-1 --family ipv4
    ipamctl release node-a --owner pod-1
    ipamctl --json nodes list

Human text by default, `--json` for protobuf JSON. A failed call prints one line to stderr and exits 1
(`ipamctl: RESOURCE_EXHAUSTED POOL_EMPTY: …`); a usage error exits 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from clients.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, Family, IpamClient, IpamClientError, node_spec
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as nodes_pb

PROG = "ipamctl"
FAMILIES = {"ipv4": Family.IPV4, "ipv6": Family.IPV6, "dual": Family.UNSPECIFIED}

# A command gets the client and the parsed arguments and returns (message for --json, human text).
Handler = Callable[[IpamClient, argparse.Namespace], tuple[Message, str]]


class UsageError(Exception):
    """Arguments argparse accepted but that do not make sense together (exit 2)."""


# -- pure formatting ---------------------------------------------------------------------------------


def format_error_line(error: BaseException | str) -> str:
    """The one line printed on stderr: `ipamctl: <CODE> <REASON>: <message>`."""
    text = " ".join(str(error).split())
    return f"{PROG}: {text}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns separated by two spaces; numbers right-aligned, everything else left-aligned."""
    rows = [list(row) for row in rows]
    cells = [list(headers)] + [[str(value) for value in row] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(headers))]
    lines = []
    for line in cells:
        padded = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(line, widths, numeric, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_fields(fields: Iterable[tuple[str, object]], indent: int = 2) -> str:
    """`label  value` lines with aligned values; empty values are left out."""
    kept = [(label, str(value)) for label, value in fields if value not in ("", None)]
    if not kept:
        return ""
    width = max(len(label) for label, _ in kept)
    return "\n".join(f"{' ' * indent}{label.ljust(width)}  {value}" for label, value in kept)


def format_nodes_table(nodes: Iterable[nodes_pb.Node]) -> str:
    """name, instance type, used, available, needed, excess — in the order given (the server's)."""
    rows = [
        [
            node.spec.name,
            node.spec.instance_type or "-",
            node.stats.used_ips,
            node.stats.available_ips,
            node.stats.needed_ips,
            node.stats.excess_ips,
        ]
        for node in nodes
    ]
    if not rows:
        return "no nodes"
    return format_table(["NAME", "INSTANCE TYPE", "USED", "AVAILABLE", "NEEDED", "EXCESS"], rows)


def format_allocation(result: pb.AllocationResult) -> str:
    """An allocated address and what a CNI plugin needs to configure it."""
    interface = result.interface_id
    if interface and result.interface_number:
        interface = f"{interface} (device {result.interface_number})"
    fields = format_fields(
        [
            ("pool", result.pool),
            ("owner", result.owner),
            ("interface", interface),
            ("mac", result.primary_mac),
            ("gateway", result.gateway_ip),
            ("vpc cidrs", ", ".join(result.cidrs)),
            ("expiration", result.expiration_uuid),
        ]
    )
    return f"{result.ip}\n{fields}" if fields else result.ip


def format_dump(response: pb.DumpResponse) -> str:
    """Allocated addresses (IPv4 then IPv6, in address order) with their owners, then the status line."""
    rows = [[ip, owner] for table in (response.ipv4, response.ipv6) for ip, owner in _by_address(table)]
    text = format_table(["IP", "OWNER"], rows) if rows else "no allocations"
    return f"{text}\n\n{response.status}" if response.status else text


def format_node(node: nodes_pb.Node) -> str:
    """Spec, limits, stats and interfaces of a node."""
    spec, stats = node.spec, node.stats
    limits = ""
    if node.max_interfaces or node.ipv4_per_interface:
        limits = f"{node.max_interfaces or '?'} interfaces x {node.ipv4_per_interface or '?'} IPv4"
    sections = [
        f"node {spec.name}",
        format_fields(
            [
                ("instance", spec.instance_id),
                ("instance type", spec.instance_type),
                ("availability zone", spec.availability_zone),
                ("vpc", spec.vpc_id),
                ("subnets", ", ".join(spec.subnet_ids)),
                ("subnet tags", _tags(spec.subnet_tags)),
                ("security groups", ", ".join(spec.security_group_ids)),
                ("security group tags", _tags(spec.security_group_tags)),
                ("first interface", spec.first_interface_index),
                ("pre-allocate", spec.pre_allocate),
                ("min-allocate", spec.min_allocate),
                ("max-allocate", spec.max_allocate),
                ("max above watermark", spec.max_above_watermark),
                ("ipv6", _yes_no(spec.ipv6_enabled)),
                ("release excess", _yes_no(spec.release_excess)),
                ("limits", limits),
                ("pools", ", ".join(node.pools)),
                ("vpc cidrs", ", ".join(node.vpc_cidrs)),
            ]
        ),
        "stats",
        format_fields(
            [
                ("used", stats.used_ips),
                ("available", stats.available_ips),
                ("needed", stats.needed_ips),
                ("excess", stats.excess_ips),
                ("cooling", stats.cooling_ips),
                ("reserved", stats.reserved_ips),
                ("excluded", stats.excluded_ips),
                ("used ipv6", stats.used_ipv6),
                ("available ipv6", stats.available_ipv6),
                ("needed ipv6", stats.needed_ipv6),
                ("excess ipv6", stats.excess_ipv6),
                ("remaining interfaces", stats.remaining_interfaces),
                ("interface candidates", stats.interface_candidates),
                ("empty interface slots", stats.empty_interface_slots),
                ("deficit reason", stats.deficit_reason),
                ("lost (gone from the cloud)", stats.lost_ips),
            ]
        ),
        "interfaces",
    ]
    if node.interfaces:
        rows = [
            [i.id, i.device_index, i.subnet_id, i.subnet_cidr, i.mac, i.primary_ip, len(i.addresses)]
            for i in node.interfaces
        ]
        table = format_table(["ID", "DEVICE", "SUBNET", "CIDR", "MAC", "PRIMARY IP", "ADDRESSES"], rows)
        sections.append("\n".join(f"  {line}" for line in table.splitlines()))
    else:
        sections.append("  none")
    return "\n".join(section for section in sections if section)


def to_json(message: Message) -> str:
    """Protobuf JSON with the .proto field names, zero values included."""
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
    )


def _by_address(table: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted(table.items(), key=lambda item: _address_key(item[0]))


def _address_key(ip: str) -> tuple[int, int, str]:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return (9, 0, ip)
    return (address.version, int(address), ip)


def _tags(tags: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(tags.items()))


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# -- commands ----------------------------------------------------------------------------------------


def _allocate(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    if args.ip is not None:
        ignored = [
            flag
            for flag, value in (
                ("--family", args.family),
                ("--expiration", args.expiration),
                ("--idempotency-key", args.idempotency_key),
                ("--wait", args.wait or None),
            )
            if value is not None
        ]
        if ignored:
            raise UsageError(f"allocate --ip does not take {', '.join(ignored)}")
        result = client.allocate(args.node, args.ip, args.owner, args.pool)
        return pb.AllocateResponse(result=result), format_allocation(result)
    response = client.allocate_next(
        args.node,
        args.pool,
        FAMILIES[args.family or "dual"],
        owner=args.owner,
        expiration_seconds=args.expiration or 0,
        idempotency_key=args.idempotency_key or "",
        wait_for_refill=args.wait,
    )
    results = [getattr(response, name) for name in ("ipv4", "ipv6") if response.HasField(name)]
    return response, "\n".join(format_allocation(result) for result in results)


def _release(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    released = client.release(args.node, args.pool, ip=args.ip, owner=args.owner)
    text = "\n".join(f"released {ip}" for ip in released) or "nothing released"
    return pb.ReleaseResponse(released_ips=released), text


def _exclude(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    client.exclude_ip(args.node, args.ip, args.owner, args.pool)
    return pb.ExcludeIPResponse(), f"excluded {args.ip} on node {args.node}"


def _dump(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    response = client.dump(args.node, args.pool)
    return response, format_dump(response)


def _status(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    status = client.debug_status()
    return pb.DebugStatusResponse(status=status), status


def _nodes_list(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    nodes = client.list_nodes(order_by_watermark=True)
    return nodes_pb.ListNodesResponse(nodes=nodes), format_nodes_table(nodes)


def _node_show(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    node = client.get_node(args.name, args.pool)
    return node, format_node(node)


def _node_create(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    spec = node_spec(
        args.name,
        instance_id=args.instance_id,
        instance_type=args.instance_type,
        availability_zone=args.availability_zone,
        vpc_id=args.vpc_id,
        subnet_ids=args.subnet_id,
        subnet_tags=dict(args.subnet_tag),
        security_group_ids=args.security_group_id,
        security_group_tags=dict(args.security_group_tag),
        first_interface_index=args.first_interface_index,
        pre_allocate=args.pre_allocate,
        min_allocate=args.min_allocate,
        max_allocate=args.max_allocate,
        max_above_watermark=args.max_above_watermark,
        ipv6_enabled=args.ipv6,
        release_excess=args.release_excess,
    )
    node = client.create_node(spec)
    return node, format_node(node)


def _node_delete(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    client.delete_node(args.name)
    return nodes_pb.DeleteNodeResponse(), f"deleted node {args.name}"


def _ping(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    started = time.perf_counter()
    client.ping()
    elapsed_ms = (time.perf_counter() - started) * 1000
    return pb.PingResponse(), f"pong from {client.target} in {elapsed_ms:.1f} ms"


# -- arguments ---------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: global flags, then one sub-command (`nodes list`, `node show`, … nest)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Command line of the ipam allocator.")
    parser.add_argument(
        "--address",
        default=os.environ.get("IPAM_GRPC_ADDRESS", DEFAULT_ADDRESS),
        help="allocator host:port, or several comma-separated (env IPAM_GRPC_ADDRESS; default %(default)s)",
    )
    parser.add_argument("--token", default=os.environ.get("IPAM_TOKEN"), help="bearer token (env IPAM_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--tls-ca", metavar="FILE", help="root certificates (PEM); implies --tls")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="deadline of the call in seconds (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print protobuf JSON")
    # --json is accepted after the sub-command too; SUPPRESS keeps it from resetting the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print protobuf JSON")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler, help: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    allocate = command(commands, "allocate", _allocate, "allocate the next free address(es), or --ip")
    allocate.add_argument("node")
    allocate.add_argument("--owner", required=True)
    allocate.add_argument("--pool", default="")
    allocate.add_argument("--family", choices=FAMILIES, help="default: dual (every family enabled)")
    allocate.add_argument("--ip", help="allocate this address")
    allocate.add_argument("--expiration", type=_non_negative, metavar="SECONDS", help="start an expiration timer")
    allocate.add_argument("--idempotency-key", help="a retry with the same key returns the same addresses")
    allocate.add_argument("--wait", action="store_true", help="wait (within --timeout) for a refill under way")

    release = command(commands, "release", _release, "release an address, or every address of an owner")
    release.add_argument("node")
    release.add_argument("--pool", default="")
    target = release.add_mutually_exclusive_group(required=True)
    target.add_argument("--ip")
    target.add_argument("--owner")

    exclude = command(commands, "exclude", _exclude, "take an address out of circulation")
    exclude.add_argument("node")
    exclude.add_argument("ip")
    exclude.add_argument("--owner", required=True)
    exclude.add_argument("--pool", default="")

    dump = command(commands, "dump", _dump, "allocated addresses of a pool and their owners")
    dump.add_argument("node")
    dump.add_argument("--pool", default="")

    command(commands, "status", _status, "the allocator's debug status")
    command(commands, "ping", _ping, "check that the allocator answers")

    nodes = commands.add_parser("nodes", help="all nodes").add_subparsers(
        dest="nodes_command", required=True, metavar="COMMAND"
    )
    command(nodes, "list", _nodes_list, "nodes with their pool stats, biggest deficit first")

    node = commands.add_parser("node", help="one node").add_subparsers(
        dest="node_command", required=True, metavar="COMMAND"
    )
    show = command(node, "show", _node_show, "spec, stats and interfaces of a node")
    show.add_argument("name")
    show.add_argument("--pool", default="", help="stats of this pool (default: default)")

    create = command(node, "create", _node_create, "register a node")
    create.add_argument("name")
    create.add_argument("--instance-id", required=True)
    create.add_argument("--instance-type", required=True)
    create.add_argument("--availability-zone", default="")
    create.add_argument("--vpc-id", default="")
    create.add_argument("--subnet-id", action="append", default=[], help="repeatable")
    create.add_argument("--subnet-tag", action="append", default=[], type=_key_value, metavar="KEY=VALUE")
    create.add_argument("--security-group-id", action="append", default=[], help="repeatable")
    create.add_argument("--security-group-tag", action="append", default=[], type=_key_value, metavar="KEY=VALUE")
    create.add_argument("--first-interface-index", type=_non_negative, default=0, metavar="N")
    create.add_argument("--pre-allocate", type=_non_negative, metavar="N", help="default: the server's (8)")
    create.add_argument("--min-allocate", type=_non_negative, default=0, metavar="N")
    create.add_argument("--max-allocate", type=_non_negative, default=0, metavar="N")
    create.add_argument("--max-above-watermark", type=_non_negative, default=0, metavar="N")
    create.add_argument("--ipv6", action="store_true", help="also assign IPv6 addresses")
    create.add_argument("--release-excess", action="store_true", help="give excess addresses back to the cloud")

    delete = command(node, "delete", _node_delete, "forget a node and its pools")
    delete.add_argument("name")
    return parser


# -- entry point -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `ipamctl`: 0 on success, 1 when the call fails, 2 on a usage error."""
    args = build_parser().parse_args(argv)  # exits 2 on its own usage errors
    try:
        with IpamClient(
            args.address,
            args.token,
            timeout=args.timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ) as client:
            message, text = args.handler(client, args)
    except IpamClientError as error:
        return _fail(error, 1)
    except (UsageError, ValueError) as error:
        return _fail(error, 2)
    except OSError as error:  # an unreadable TLS file
        return _fail(f"{error.filename or ''}: {error.strerror or error}", 2)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - even a bug prints one line, never a traceback
        return _fail(f"unexpected error: {type(error).__name__}: {error}", 1)
    try:
        print(to_json(message) if args.json else text, flush=True)
    except BrokenPipeError:
        # The reader went away (`ipamctl dump n1 | head`): silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _fail(error: BaseException | str, exit_code: int) -> int:
    print(format_error_line(error), file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
