"""ipamctl: the command line over the Python client of the ipam allocator.

    ipamctl status
    ipamctl allocate node-a --owner pod-1 --family ipv4
    ipamctl release node-a --owner pod-1
    ipamctl nodes list -o json

Global flags go before or after the command. The token, the address and the timeout come from the
flag, else the environment (IPAM_TOKEN, IPAM_GRPC_ADDRESS, IPAM_TIMEOUT), else the config file
(IPAM_CONFIG, default ~/.config/ipam/config: `token = ...`, `address = ...`, `timeout = ...` lines).
Human text by default, `-o json` (or `--json`) for JSON objects. A failed call prints one line to
stderr and exits 1 (`ipamctl: RESOURCE_EXHAUSTED POOL_EMPTY: …`); a usage error exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from clients.client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, Family, IpamClient, IpamClientError, node_spec
from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as nodes_pb
from services.core.reasons import DeficitReason

PROG = "ipamctl"
FAMILIES = {"ipv4": Family.IPV4, "ipv6": Family.IPV6, "dual": Family.UNSPECIFIED}

# A command gets the client and the parsed arguments and returns (message or dict for -o json, human text).
Handler = Callable[[IpamClient, argparse.Namespace], tuple[Message | dict[str, Any], str]]
CONFIG_ENV = "IPAM_CONFIG"
DEFAULT_CONFIG = Path("~/.config/ipam/config")


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
    """name, instance type, used, free, available, needed, excess — in the order given (the server's).
    AVAILABLE is Cilium's: attached to the node, used or not; FREE is what may still be handed out."""
    rows = [
        [
            node.spec.name,
            node.spec.instance_type or "-",
            node.stats.used_ips,
            free_ips(node.stats),
            node.stats.available_ips,
            node.stats.needed_ips,
            node.stats.excess_ips,
        ]
        for node in nodes
    ]
    if not rows:
        return "no nodes"
    return format_table(["NAME", "INSTANCE TYPE", "USED", "FREE", "AVAILABLE", "NEEDED", "EXCESS"], rows)


def free_ips(stats: nodes_pb.NodeStats) -> int:
    """Addresses that may be handed out now: attached, not used, not cooling down."""
    return max(stats.available_ips - stats.used_ips - stats.cooling_ips, 0)


def node_state(node: nodes_pb.Node) -> str:
    """ok, in-deficit, at-capacity (a deficit the cloud cannot fill: the reason says why), excess."""
    if node.stats.needed_ips > 0 or node.stats.needed_ipv6 > 0:
        return "at-capacity" if node.stats.deficit_reason else "in-deficit"
    if node.stats.excess_ips > 0 or node.stats.excess_ipv6 > 0:
        return "excess"
    return "ok"


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
            ("subnet", result.subnet_cidr),
            ("gateway", result.gateway_ip),
            ("vpc cidrs", ", ".join(result.cidrs)),
            ("expiration", result.expiration_uuid),
        ]
    )
    return f"{result.ip}\n{fields}" if fields else result.ip


def format_dump(response: pb.DumpResponse) -> str:
    """Allocated addresses (IPv4 then IPv6, in address order) with their owners, the pool's subnets
    per family with their gateways, then the status line."""
    rows = [[ip, owner] for table in (response.ipv4, response.ipv6) for ip, owner in _by_address(table)]
    text = format_table(["IP", "OWNER"], rows) if rows else "no allocations"
    if response.subnets:
        subnets = [
            [_FAMILY_NAMES.get(s.family, "?"), s.cidr or "-", s.gateway_ip or "-", ", ".join(s.interface_ids)]
            for s in response.subnets
        ]
        text += "\n\n" + format_table(["FAMILY", "SUBNET", "GATEWAY", "INTERFACES"], subnets)
    if response.prefixes:
        text += "\n\n" + format_prefixes(response.prefixes)
    return f"{text}\n\n{response.status}" if response.status else text


def format_prefixes(prefixes: Iterable[pb.PrefixUse]) -> str:
    """A pool's IPv4 /28 prefixes and the use of their 16 addresses each."""
    rows = [[p.prefix, p.interface_id, p.free, p.cooling, p.allocated, p.excluded, p.reserved] for p in prefixes]
    return format_table(["PREFIX", "INTERFACE", "FREE", "COOLING", "ALLOCATED", "EXCLUDED", "RESERVED"], rows)


_FAMILY_NAMES = {pb.FAMILY_IPV4: "ipv4", pb.FAMILY_IPV6: "ipv6"}


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
                (
                    "prefix delegation",
                    _yes_no(spec.prefix_delegation) if spec.HasField("prefix_delegation") else "worker's default",
                ),
                ("limits", limits),
                ("pools", ", ".join(node.pools)),
                ("vpc cidrs", ", ".join(node.vpc_cidrs)),
            ]
        ),
        "stats",
        format_fields(
            [
                ("used", stats.used_ips),
                ("free", free_ips(stats)),
                ("available (attached)", stats.available_ips),
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
                ("last cloud error", _last_error(node)),
                ("lost (gone from the cloud)", stats.lost_ips),
                ("max allocatable ipv4", stats.max_allocatable_ipv4),
                ("ipv4 prefixes", stats.ipv4_prefixes),
                ("ipv6 prefix", node.ipv6_prefix),
            ]
        ),
        "interfaces",
    ]
    if node.interfaces:
        rows = [
            [
                i.id,
                i.device_index,
                i.subnet_id,
                i.subnet_cidr or "-",
                i.gateway_ip or "-",
                i.subnet_ipv6_cidr or "-",
                i.gateway_ipv6 or "-",
                i.mac,
                i.primary_ip,
                len(i.addresses),
                len(i.ipv4_prefixes),
            ]
            for i in node.interfaces
        ]
        headers = ["ID", "DEVICE", "SUBNET", "IPV4 CIDR", "IPV4 GATEWAY", "IPV6 CIDR", "IPV6 GATEWAY"]
        table = format_table([*headers, "MAC", "PRIMARY IP", "ADDRESSES", "PREFIXES"], rows)
        sections.append("\n".join(f"  {line}" for line in table.splitlines()))
    else:
        sections.append("  none")
    if node.prefixes:
        sections += ["prefixes", "\n".join(f"  {line}" for line in format_prefixes(node.prefixes).splitlines())]
    return "\n".join(section for section in sections if section)


def to_json(message: Message | dict[str, Any]) -> str:
    """Protobuf JSON with the .proto field names, zero values included; a dict as it is."""
    if isinstance(message, dict):
        return json.dumps(message, indent=2, sort_keys=False)
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
    )


def message_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
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


def _debug_status(client: IpamClient, args: argparse.Namespace) -> tuple[Message | dict[str, Any], str]:
    status = client.debug_status()
    return {"status": status, "lines": status.splitlines()}, status


def _status(client: IpamClient, args: argparse.Namespace) -> tuple[Message | dict[str, Any], str]:
    """One screen: each allocator replica reachable or not, the workers, nodes by state, events."""
    allocators = []
    for address in [a.strip() for a in args.address.split(",") if a.strip()]:
        entry: dict[str, Any] = {"address": address, "reachable": True, "error": ""}
        try:
            with _client(args, address) as one:
                started = time.perf_counter()
                one.ping(timeout=min(args.timeout, 3.0))
                entry["ms"] = round((time.perf_counter() - started) * 1000, 1)
        except IpamClientError as error:
            entry.update(reachable=False, error=str(error))
        allocators.append(entry)
    redis = client.redis_status()
    nodes = client.list_nodes(order_by_watermark=True)
    events = client.list_dead_events(limit=5)
    by_state: dict[str, list[str]] = {"ok": [], "in-deficit": [], "at-capacity": [], "excess": []}
    for node in nodes:
        by_state[node_state(node)].append(node.spec.name)
    # A worker is alive while its heartbeat is; a dead one is shown only while it holds events.
    workers = [
        {
            "name": c.name,
            "alive": c.alive,
            "heartbeat_expires_in_ms": c.heartbeat_expires_in_ms,
            "pending": c.pending,
        }
        for c in events.consumers
        if c.alive or c.pending
    ]
    result = {
        "allocators": allocators,
        "redis": {
            "mode": redis.mode,
            "master": redis.master,
            "masters": redis.masters,
            "replicas": redis.replicas,
            "replicas_in_sync": redis.replicas_in_sync,
            "min_replicas": redis.min_replicas,
        },
        "workers": workers,
        "nodes": {"total": len(nodes), **{state: len(names) for state, names in by_state.items()}},
        "nodes_by_state": by_state,
        "events": {"pending": events.pending, "dead": events.total},
    }
    return result, format_status(result, nodes)


def format_redis(redis: Mapping[str, Any]) -> str:
    """One line: where the allocator writes, and whether enough replicas hold its writes."""
    where = f"{redis['masters']} masters" if redis["mode"] == "cluster" else f"master {redis['master']}"
    per = ", the fewest of any master" if redis["mode"] == "cluster" else ""
    line = f"redis  {redis['mode']}, {where}: {redis['replicas']} replicas ({redis['replicas_in_sync']} in sync{per})"
    if redis["min_replicas"]:
        line += f"; a change is answered once {redis['min_replicas']} hold it"
        if redis["replicas_in_sync"] < redis["min_replicas"]:
            line += ": too few in sync, changes answer OUTCOME_UNKNOWN"
    return line


def format_status(status: Mapping[str, Any], nodes: Sequence[nodes_pb.Node]) -> str:
    lines = ["allocators"]
    for a in status["allocators"]:
        state = f"reachable ({a['ms']} ms)" if a["reachable"] else f"UNREACHABLE: {a['error']}"
        lines.append(f"  {a['address']:<24} {state}")
    lines.append(format_redis(status["redis"]))
    lines.append("workers")
    live = [w for w in status["workers"] if w["alive"]]
    for w in status["workers"]:
        if w["alive"]:
            state = f"alive (heartbeat good for {w['heartbeat_expires_in_ms'] / 1000:.0f} s more)"
        else:
            state = "gone (another worker claims what it took)"
        lines.append(f"  {w['name']:<24} {state}, {w['pending']} taken")
    if not live:
        lines.append("  none alive: pools are not refilled")
    counts = status["nodes"]
    lines.append(
        f"nodes  {counts['total']} total: {counts['ok']} ok, {counts['in-deficit']} in deficit, "
        f"{counts['at-capacity']} at capacity, {counts['excess']} with excess"
    )
    for node in nodes:
        if node_state(node) != "ok":
            reason = f" ({node.stats.deficit_reason})" if node.stats.deficit_reason else ""
            lines.append(
                f"  {node.spec.name:<24} {node_state(node)}{reason}: needed {node.stats.needed_ips}, "
                f"free {free_ips(node.stats)}, excess {node.stats.excess_ips}"
            )
        elif node.last_error.startswith(DeficitReason.PREFIX_DELEGATION_UNSUPPORTED):
            lines.append(f"  {node.spec.name:<24} ok, but {node.last_error}")
    events = status["events"]
    hint = "  (ipamctl events dead)" if events["dead"] else ""
    lines.append(f"events {events['pending']} pending, {events['dead']} dead-lettered{hint}")
    return "\n".join(lines)


def _node_update(client: IpamClient, args: argparse.Namespace) -> tuple[Message | dict[str, Any], str]:
    spec = client.get_node(args.name).spec
    changes = {
        "pre_allocate": args.pre_allocate,
        "min_allocate": args.min_allocate,
        "max_allocate": args.max_allocate,
        "max_above_watermark": args.max_above_watermark,
        "ipv6_enabled": args.ipv6,
        "release_excess": args.release_excess,
        "prefix_delegation": args.prefix_delegation,
    }
    if all(value is None for value in changes.values()):
        raise UsageError("node update: give at least one setting to change")
    for name, value in changes.items():
        if value is not None:
            setattr(spec, name, value)
    if args.pre_allocate is not None:
        spec.pre_allocate_set = True
    node = client.update_node(spec)
    return node, format_node(node)


def _resync(client: IpamClient, args: argparse.Namespace) -> tuple[Message | dict[str, Any], str]:
    response = client.resync()
    return response, f"re-evaluated {response.nodes} nodes, published {response.events_published} events"


def _events_dead(client: IpamClient, args: argparse.Namespace) -> tuple[Message | dict[str, Any], str]:
    response = client.list_dead_events(limit=args.limit)
    rows = [
        [
            d.id,
            d.event.node,
            d.event.pool or "default",
            nodes_kind(d.event.kind),
            d.deliveries,
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.event.published_at_ms / 1000)),
        ]
        for d in response.events
    ]
    table = (
        format_table(["ID", "NODE", "POOL", "KIND", "TRIES", "PUBLISHED (UTC)"], rows) if rows else "no dead letters"
    )
    shown = f" (newest {len(rows)} shown)" if len(rows) < response.total else ""
    return response, f"{table}\n\n{response.total} dead-lettered{shown}, {response.pending} pending"


def nodes_kind(kind: int) -> str:
    from ipam.v1 import events_pb2

    return events_pb2.PoolEvent.Kind.Name(kind).removeprefix("KIND_").lower()


def _events_replay(client: IpamClient, args: argparse.Namespace) -> tuple[Message | dict[str, Any], str]:
    if bool(args.ids) == args.all:
        raise UsageError("events replay: give dead-letter ids or --all")
    response = client.replay_dead_events(args.ids, all=args.all)
    lines = [f"replayed {i}" for i in response.replayed] + [f"not found {i}" for i in response.not_found]
    return response, "\n".join(lines) or "nothing to replay"


def _nodes_list(client: IpamClient, args: argparse.Namespace) -> tuple[Message, str]:
    nodes = client.list_nodes(order_by_watermark=True)
    return nodes_pb.ListNodesResponse(nodes=nodes), format_nodes_table(nodes)


def _last_error(node: Any) -> str:
    """The worker's last error on the node and when it happened (UTC), "" when there is none."""
    if not node.last_error:
        return ""
    when = datetime.datetime.fromtimestamp(node.last_error_ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{node.last_error} (at {when})"


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
        prefix_delegation=args.prefix_delegation,
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


def _add_global_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global flags; on a sub-command (`suppress`) an absent flag leaves the top-level value."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global flags (before or after the command)")
    group.add_argument(
        "--address",
        default=default(None),
        help="allocator host:port, or several comma-separated (else IPAM_GRPC_ADDRESS, the config file, "
        f"{DEFAULT_ADDRESS})",
    )
    group.add_argument("--token", default=default(None), help="bearer token (else IPAM_TOKEN, the config file)")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help=f"config file (else {CONFIG_ENV}, else {DEFAULT_CONFIG}): `token = ...`, `address = ...` lines",
    )
    group.add_argument("--tls", action="store_true", default=default(False), help="TLS with the system's roots")
    group.add_argument("--tls-ca", metavar="FILE", default=default(None), help="root certificates (PEM); implies --tls")
    group.add_argument("--tls-cert", metavar="FILE", default=default(None), help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", metavar="FILE", default=default(None), help="client private key (mutual TLS)")
    group.add_argument(
        "--timeout",
        type=float,
        default=default(None),
        help=f"deadline of each call in seconds (else IPAM_TIMEOUT, the config file, {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "-o", "--output", choices=("text", "json"), default=default("text"), help="text (default) or json"
    )
    group.add_argument("--json", action="store_true", default=default(False), help="the same as -o json")


_EXAMPLES = """examples:
  export IPAM_TOKEN=change-me-admin        # or: token = change-me-admin in ~/.config/ipam/config
  ipamctl status                           # allocators, workers, nodes by state, events
  ipamctl nodes list -o json
  ipamctl node show node-a
  ipamctl node update node-a --pre-allocate 16 --ipv6
  ipamctl allocate node-a --owner pod-1 --family ipv4 --token change-me-client
  ipamctl events dead && ipamctl events replay --all

roles: `client` tokens may call allocate, release, exclude, dump, ping, debug-status; every other
command needs an `admin` token (admin may call everything).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: global flags (anywhere), then one sub-command (`nodes list`, `node show`, … nest)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command line of the ipam allocator.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_global_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, suppress=True)

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Handler,
        help: str,
        role: str,
        example: str,
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(
            name,
            parents=[common],
            help=f"{help} [{role}]",
            description=f"{help}. Role: {role}.",
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    def group(name: str, help: str, dest: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        holder = commands.add_parser(name, parents=[common], help=help, description=help)
        return holder.add_subparsers(dest=dest, required=True, metavar="COMMAND")

    pool_help = "the pool (default: default)"
    allocate = command(
        commands,
        "allocate",
        _allocate,
        "allocate the next free address(es), or a given one with --ip",
        "client",
        "ipamctl allocate node-a --owner pod-1 --family ipv4",
    )
    allocate.add_argument("node", help="the node to allocate on")
    allocate.add_argument("--owner", required=True, help="who holds the address (a pod, a container id)")
    allocate.add_argument("--pool", default="", help=pool_help)
    allocate.add_argument("--family", choices=FAMILIES, help="ipv4, ipv6 or dual (default: every family enabled)")
    allocate.add_argument("--ip", help="allocate this address instead of the next free one")
    allocate.add_argument("--expiration", type=_non_negative, metavar="SECONDS", help="start an expiration timer")
    allocate.add_argument("--idempotency-key", help="a retry with the same key returns the same addresses")
    allocate.add_argument("--wait", action="store_true", help="wait (within --timeout) for a refill under way")

    release = command(
        commands,
        "release",
        _release,
        "release an address, or every address of an owner",
        "client",
        "ipamctl release node-a --owner pod-1",
    )
    release.add_argument("node", help="the node holding the address")
    release.add_argument("--pool", default="", help=pool_help)
    target = release.add_mutually_exclusive_group(required=True)
    target.add_argument("--ip", help="the address to release")
    target.add_argument("--owner", help="release every address of this owner")

    exclude = command(
        commands,
        "exclude",
        _exclude,
        "take an address out of circulation",
        "client",
        "ipamctl exclude node-a 10.0.1.7 --owner ops",
    )
    exclude.add_argument("node", help="the node holding the address")
    exclude.add_argument("ip", help="the address to exclude")
    exclude.add_argument("--owner", required=True, help="who excluded it (shown by dump)")
    exclude.add_argument("--pool", default="", help=pool_help)

    dump = command(
        commands, "dump", _dump, "allocated addresses of a pool and their owners", "client", "ipamctl dump node-a"
    )
    dump.add_argument("node", help="the node")
    dump.add_argument("--pool", default="", help=pool_help)

    command(
        commands,
        "status",
        _status,
        "one screen: allocators and workers reachable, nodes by state, events pending and dead",
        "admin",
        "ipamctl status -o json",
    )
    command(
        commands, "debug-status", _debug_status, "the allocator's debug status text", "client", "ipamctl debug-status"
    )
    command(
        commands, "ping", _ping, "check that the allocator answers", "client", "ipamctl ping --address 127.0.0.1:50051"
    )
    command(
        commands,
        "resync",
        _resync,
        "re-evaluate every node's pools now and publish the events needed",
        "admin",
        "ipamctl resync",
    )

    nodes = group("nodes", "all nodes", "nodes_command")
    command(
        nodes, "list", _nodes_list, "nodes with their pool stats, biggest deficit first", "admin", "ipamctl nodes list"
    )

    node = group("node", "one node", "node_command")
    show = command(
        node, "show", _node_show, "spec, stats and interfaces of a node", "admin", "ipamctl node show node-a"
    )
    show.add_argument("name", help="the node")
    show.add_argument("--pool", default="", help="stats of this pool (default: default)")

    create = command(
        node,
        "create",
        _node_create,
        "register a node",
        "admin",
        "ipamctl node create node-a --instance-id i-0abc --instance-type m5.large --subnet-tag ipam.io/pods=true",
    )
    create.add_argument("name", help="the node's name (what allocate takes)")
    create.add_argument("--instance-id", required=True, help="its EC2 instance")
    create.add_argument("--instance-type", required=True, help="its instance type (sets its interface limits)")
    create.add_argument("--availability-zone", default="", help="its zone")
    create.add_argument("--vpc-id", default="", help="its VPC")
    create.add_argument("--subnet-id", action="append", default=[], help="subnet for new interfaces (repeatable)")
    create.add_argument(
        "--subnet-tag", action="append", default=[], type=_key_value, metavar="KEY=VALUE", help="subnets by tag"
    )
    create.add_argument("--security-group-id", action="append", default=[], help="for new interfaces (repeatable)")
    create.add_argument(
        "--security-group-tag",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="security groups by tag",
    )
    create.add_argument(
        "--first-interface-index", type=_non_negative, default=0, metavar="N", help="lowest device index"
    )
    create.add_argument("--pre-allocate", type=_non_negative, metavar="N", help="free addresses kept (default: 8)")
    create.add_argument("--min-allocate", type=_non_negative, default=0, metavar="N", help="addresses kept at least")
    create.add_argument(
        "--max-allocate", type=_non_negative, default=0, metavar="N", help="addresses at most (0: none)"
    )
    create.add_argument(
        "--max-above-watermark", type=_non_negative, default=0, metavar="N", help="extra addresses allowed above"
    )
    create.add_argument("--ipv6", action="store_true", help="also assign IPv6 addresses")
    create.add_argument("--release-excess", action="store_true", help="give excess addresses back to the cloud")
    create.add_argument(
        "--prefix-delegation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="IPv4 in /28 prefixes on Nitro types, or not (unset: the worker's IPAM_PREFIX_DELEGATION)",
    )

    update = command(
        node,
        "update",
        _node_update,
        "change a node's watermarks or IPv6 (the other settings stay)",
        "admin",
        "ipamctl node update node-a --pre-allocate 16 --no-ipv6",
    )
    update.add_argument("name", help="the node")
    update.add_argument("--pre-allocate", type=_non_negative, metavar="N", help="free addresses kept")
    update.add_argument("--min-allocate", type=_non_negative, metavar="N", help="addresses kept at least")
    update.add_argument("--max-allocate", type=_non_negative, metavar="N", help="addresses at most (0: no limit)")
    update.add_argument("--max-above-watermark", type=_non_negative, metavar="N", help="extra addresses allowed above")
    update.add_argument(
        "--ipv6", action=argparse.BooleanOptionalAction, default=None, help="assign IPv6 addresses too, or not"
    )
    update.add_argument(
        "--release-excess", action=argparse.BooleanOptionalAction, default=None, help="give excess back, or not"
    )
    update.add_argument(
        "--prefix-delegation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="IPv4 in /28 prefixes on Nitro types, or not; what is attached stays until released",
    )

    delete = command(node, "delete", _node_delete, "forget a node and its pools", "admin", "ipamctl node delete node-a")
    delete.add_argument("name", help="the node")

    events = group("events", "the pool events stream", "events_command")
    dead = command(
        events,
        "dead",
        _events_dead,
        "events the worker gave up on (dead letters), newest first",
        "admin",
        "ipamctl events dead --limit 20",
    )
    dead.add_argument("--limit", type=_non_negative, default=50, metavar="N", help="show at most N (default 50)")
    replay = command(
        events,
        "replay",
        _events_replay,
        "put dead-lettered events back on the stream, to be handled again",
        "admin",
        "ipamctl events replay --all",
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (from events dead)")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    return parser


def _version() -> str:
    try:
        return metadata.version("ipam")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- settings: flag > environment > config file > default -------------------------------------------


@dataclass(frozen=True)
class Settings:
    address: str
    token: str | None
    timeout: float


def read_config(text: str) -> dict[str, str]:
    """`key = value` lines; `#` comments and blank lines are skipped."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            config[key.strip().lower()] = value.strip().strip("\"'")
    return config


def config_path(flag: str | None, environ: Mapping[str, str]) -> Path:
    return Path(flag or environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str], config: Mapping[str, str]) -> Settings:
    """Each setting from the flag, else the environment, else the config file, else the default."""

    def pick(flag: Any, env: str, key: str, default: Any) -> Any:
        for value in (flag, environ.get(env), config.get(key)):
            if value not in (None, ""):
                return value
        return default

    timeout = pick(args.timeout, "IPAM_TIMEOUT", "timeout", DEFAULT_TIMEOUT)
    try:
        timeout = float(timeout)
    except ValueError:
        raise UsageError(f"timeout {timeout!r} is not a number") from None
    return Settings(
        address=pick(args.address, "IPAM_GRPC_ADDRESS", "address", DEFAULT_ADDRESS),
        token=pick(args.token, "IPAM_TOKEN", "token", None),
        timeout=timeout,
    )


def _client(args: argparse.Namespace, address: str | None = None) -> IpamClient:
    return IpamClient(
        address or args.address,
        args.token,
        timeout=args.timeout,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


# -- entry point -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `ipamctl`: 0 on success, 1 when the call fails, 2 on a usage error."""
    args = build_parser().parse_args(argv)  # exits 2 on its own usage errors
    args.json = args.json or args.output == "json"
    try:
        path = config_path(args.config, os.environ)
        config = read_config(path.read_text()) if path.exists() else {}
        if args.config and not path.exists():
            raise UsageError(f"config file {path} does not exist")
        settings = resolve_settings(args, os.environ, config)
        args.address, args.token, args.timeout = settings.address, settings.token, settings.timeout
        with _client(args) as client:
            message, text = args.handler(client, args)
    except IpamClientError as error:
        return _fail(_with_hint(error, args.address), 1)
    except (UsageError, ValueError) as error:
        return _fail(error, 2)
    except OSError as error:  # an unreadable TLS or config file
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


_UNREACHABLE = ("connection refused", "failed to connect", "connect failed", "unavailable")


def _with_hint(error: IpamClientError, address: str) -> str:
    """A refused connection says what to check."""
    text = str(error)
    server_said = error.reason in ("STORE_UNAVAILABLE", "DEADLINE_TOO_SHORT")
    if error.code.name == "UNAVAILABLE" and not server_said and any(m in text.lower() for m in _UNREACHABLE):
        return f"{text} (is `make run` running? --address {address})"
    return text


def _fail(error: BaseException | str, exit_code: int) -> int:
    print(format_error_line(error), file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
