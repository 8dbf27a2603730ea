"""The CNI plugin (clients/cni) end to end: Redis, the moto server, the allocator and the worker as
real processes; the reference `bridge` plugin with ours as its IPAM, driven by cnitool into network
namespaces made here; GC and STATUS also as a runtime hands them to the IPAM plugin."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from tests.support.allocator_process import CLIENT_TOKEN, AllocatorProcess
from tests.support.api import Api
from tests.support.moto_server import DemoNetwork, MotoServer, create_demo_network, ec2_client, run_instance
from tests.support.polling import poll
from tests.support.redis_server import RedisServer, free_port
from tests.support.worker_process import WorkerProcess

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = ROOT / ".bin" / "cni" / "ipam-cni"
CNITOOL = ROOT / ".bin" / "cnitool"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
CNI_CACHE = Path("/var/lib/cni")
# Debian's reference plugins (1.1.x) speak CNI up to 1.0.0; GC and STATUS need 1.1.0.
BRIDGE_VERSION = "1.0.0"
CODE_TRY_AGAIN_LATER, CODE_NOT_AVAILABLE, CODE_ADDRESS_NOT_HELD = 11, 50, 102


def _netns_refusal() -> str | None:
    """Why this kernel (or user) cannot have network namespaces, found by trying; None when it can."""
    name = f"ipcni-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return made.stderr.strip() or f"ip netns add exited with {made.returncode}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass
class Cni:
    """A node whose pool the worker fills from the local EC2, and a bridge network using our plugin."""

    api: Api
    allocator: AllocatorProcess
    tmp: Path
    network: str
    bridge: str
    node: str
    token_file: Path
    redis_url: str = ""
    ec2: Any = None
    demo: DemoNetwork | None = None
    namespaces: list[str] = field(default_factory=list)

    def ipam(self, node: str | None = None, address: str | None = None, family: str = "ipv4") -> dict[str, Any]:
        return {
            "type": PLUGIN.name,
            "allocator": address or self.allocator.address,
            "tokenFile": str(self.token_file),
            "node": node or self.node,
            "deadlineSeconds": 30,
            "family": family,
        }

    def plugin_conf(
        self, version: str = BRIDGE_VERSION, node: str | None = None, family: str = "ipv4", **extra: Any
    ) -> dict[str, Any]:
        """The bridge's plugin config: what the bridge hands on to its IPAM plugin."""
        return {
            "cniVersion": version,
            "name": self.network,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": False,
            "ipMasq": False,
            "ipam": self.ipam(node, family=family),
            **extra,
        }

    def write_conflist(self, directory: Path, family: str = "ipv4", node: str | None = None) -> Path:
        """A network config list in `directory` (cnitool's NETCONFPATH) using our plugin for `family`
        (on `node`, else the fixture's)."""
        directory.mkdir(exist_ok=True)
        conf = self.plugin_conf(node=node, family=family)
        plugins = [{k: v for k, v in conf.items() if k not in ("cniVersion", "name")}]
        conflist = {"cniVersion": BRIDGE_VERSION, "name": self.network, "plugins": plugins}
        (directory / "10-ipcni.conflist").write_text(json.dumps(conflist))
        return directory

    def env(self, netconf_dir: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "CNI_PATH": f"{PLUGIN.parent}:{REFERENCE_PLUGINS}",
            "NETCONFPATH": str(netconf_dir or self.tmp / "net.d"),
        }

    def cnitool(
        self, verb: str, netns: str, *, args: str = "", netconf_dir: Path | None = None, network: str = ""
    ) -> subprocess.CompletedProcess[str]:
        env = self.env(netconf_dir)
        if args:
            env["CNI_ARGS"] = args
        return subprocess.run(
            [str(CNITOOL), verb, network or self.network, netns_path(netns)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def plugin(
        self, command: str, conf: dict[str, Any], container_id: str = "", ifname: str = "eth0", args: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Runs our plugin as a main plugin runs its IPAM plugin (the same environment and stdin)."""
        env = {"CNI_COMMAND": command, "CNI_PATH": f"{PLUGIN.parent}:{REFERENCE_PLUGINS}", "PATH": os.environ["PATH"]}
        if container_id:
            env |= {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname, "CNI_NETNS": "/run/netns/unused"}
        if args:
            env["CNI_ARGS"] = args
        return subprocess.run(
            [str(PLUGIN)], input=json.dumps(conf), env=env, capture_output=True, text=True, timeout=60
        )

    def add_netns(self) -> str:
        name = f"ipcni-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.namespaces.append(name)
        return name

    def dump(self, node: str | None = None) -> pb.DumpResponse:
        return self.api.alloc.Dump(pb.DumpRequest(node=node or self.node), timeout=5)

    def node_message(self, node: str) -> npb.Node:
        return self.api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)

    def keyed(self, node: str | None = None) -> dict[str, str]:
        """idempotency key -> address, for this network's attachments."""
        reply = self.api.alloc.ListAllocations(
            pb.ListAllocationsRequest(node=node or self.node, key_prefix=f"cni:{self.network}/"), timeout=5
        )
        return {a.idempotency_key: a.ip for a in reply.allocations}


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def container_id_of(netns: str) -> str:
    """The container id cnitool derives from a namespace's path."""
    return "cnitool-" + hashlib.sha512(netns_path(netns).encode()).hexdigest()[:20]


def key_of(cni: Cni, container_id: str, ifname: str = "eth0") -> str:
    return f"cni:{cni.network}/{container_id}/{ifname}"


def error_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(result.stdout)


def address_on(netns: str, ifname: str = "eth0", family: str = "inet") -> list[str]:
    """The addresses of `family` ("inet", "inet6") on the interface; IPv6's link-local one left out."""
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "-6" if family == "inet6" else "-4", "addr", "show", "dev", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(out)
        for a in link["addr_info"]
        if a["family"] == family and a.get("scope") != "link"
    ]


def ipv6_routes_in(netns: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", netns, "-j", "-6", "route", "show"], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def _fill_node(api: Api, ec2: Any, network: DemoNetwork, instance_type: str, **spec: Any) -> str:
    node = api.create_node(instance_id=run_instance(ec2, network, instance_type), instance_type=instance_type, **spec)
    want = int(spec.get("pre_allocate", 8))
    want6 = want if spec.get("ipv6_enabled") else 0
    poll(lambda: (s := api.stats(node)).available_ips >= want and s.available_ipv6 >= want6, timeout=30)
    return node


@pytest.fixture(scope="module")
def cni(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cni]:
    refusal = _netns_refusal()
    if refusal is not None:
        pytest.skip(f"network namespaces are refused here ({refusal}): the CNI tests need root and netns")
    for path in (PLUGIN, CNITOOL, REFERENCE_PLUGINS / "bridge"):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: `make test` builds and installs it (make cni cnitool cni-system)")
    tmp = tmp_path_factory.mktemp("cni")
    token_file = tmp / "token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    token_file.chmod(0o600)
    tag = uuid.uuid4().hex[:6]
    # A Redis of the module's own: on the session's, the worker would resync, and take the events
    # of, every node the earlier tests left there.
    with RedisServer() as redis, MotoServer(local_ec2=True) as moto:  # the local EC2: prefix delegation as EC2's
        ec2 = ec2_client(moto.endpoint_url)
        demo = create_demo_network(ec2, instance_types=())
        allocator = AllocatorProcess(redis.url).start()
        worker = WorkerProcess(redis.url, allocator.address, moto.endpoint_url).start()
        api = Api(allocator.address)
        cni = Cni(api, allocator, tmp, f"ipcni-net-{tag}", f"ipcni{tag}", "", token_file, redis.url)
        try:
            cni.node = _fill_node(api, ec2, demo, "m5.large", ipv6_enabled=True)
            cni.ec2, cni.demo = ec2, demo
            # The bridge made here with a MAC of its own: one the kernel picks follows the lowest port
            # MAC, and the bridge plugin's CHECK compares it with the one cached at ADD.
            mac = "02:00:" + ":".join(tag[i : i + 2] for i in range(0, 6, 2)) + ":01"
            subprocess.run(["ip", "link", "add", cni.bridge, "type", "bridge"], check=True)
            subprocess.run(["ip", "link", "set", cni.bridge, "address", mac, "up"], check=True)
            cni.write_conflist(tmp / "net.d")
            yield cni
        finally:
            for name in cni.namespaces:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            subprocess.run(["ip", "link", "del", cni.bridge], capture_output=True)
            for cached in CNI_CACHE.glob(f"results/{cni.network}-*"):
                cached.unlink(missing_ok=True)
            api.close()
            worker.stop()
            allocator.stop()


def test_add_configures_pool_addresses_in_two_namespaces_that_ping_each_other(cni: Cni) -> None:
    a, b = cni.add_netns(), cni.add_netns()
    added = {}
    pod_args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=team;K8S_POD_NAME=web-0"
    for ns, args in ((a, pod_args), (b, "")):
        result = cni.cnitool("add", ns, args=args)
        assert result.returncode == 0, result.stdout + result.stderr
        added[ns] = json.loads(result.stdout)
    dump = cni.dump()
    pool = set(dump.ipv4) | set(dump.free_ipv4)
    for ns in (a, b):
        (ip_config,) = added[ns]["ips"]
        ip = ip_config["address"].split("/")[0]
        assert ip in dump.ipv4 and ip in pool
        subnet = ipaddress.ip_network(ip_config["address"], strict=False)
        assert subnet.prefixlen == 18 and ip_config["gateway"] == str(subnet.network_address + 1)  # the VPC's /18
        assert address_on(ns) == [ip_config["address"]]
    ip_a, ip_b = (added[ns]["ips"][0]["address"].split("/")[0] for ns in (a, b))
    assert ip_a != ip_b
    assert dump.ipv4[ip_a] == f"{container_id_of(a)} team/web-0"
    assert dump.ipv4[ip_b] == container_id_of(b)
    ping = subprocess.run(
        ["ip", "netns", "exec", a, "ping", "-c", "1", "-W", "5", ip_b], capture_output=True, text=True
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    ping = subprocess.run(
        ["ip", "netns", "exec", b, "ping", "-c", "1", "-W", "5", ip_a], capture_output=True, text=True
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr

    # A repeated ADD of the attachment (as the bridge asks its IPAM plugin, with the runtime's same
    # CNI_ARGS: the owner is part of what the key belongs to) returns the same address.
    again = cni.plugin("ADD", cni.plugin_conf(), container_id_of(a), args=pod_args)
    assert again.returncode == 0, again.stdout
    assert json.loads(again.stdout)["ips"][0]["address"] == added[a]["ips"][0]["address"]
    assert cni.keyed()[key_of(cni, container_id_of(a))] == ip_a

    # CHECK passes, then fails once the address is released behind the plugin's back.
    check = cni.cnitool("check", a)
    assert check.returncode == 0, check.stdout + check.stderr
    cni.api.alloc.Release(pb.ReleaseRequest(node=cni.node, ip=ip_a), timeout=5)
    check = cni.cnitool("check", a)
    assert check.returncode != 0
    assert "holds no address" in check.stdout + check.stderr

    # DEL gives the address back, and succeeds again when repeated (and where it was already gone).
    for _ in range(2):
        deleted = cni.cnitool("del", b)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        dump = cni.dump()
        assert ip_b not in dump.ipv4 and ip_b in dump.free_ipv4
    deleted = cni.cnitool("del", a)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert key_of(cni, container_id_of(a)) not in cni.keyed()


@pytest.mark.parametrize("family", ["ipv6", "dual"])
def test_an_ipv6_container_gets_its_address_in_its_subnet_and_an_ipv6_gateway(cni: Cni, family: str) -> None:
    net_d = cni.write_conflist(cni.tmp / f"net-{family}.d", family)
    ns = cni.add_netns()
    result = cni.cnitool("add", ns, netconf_dir=net_d)
    assert result.returncode == 0, result.stdout + result.stderr
    configs = {ipaddress.ip_interface(c["address"]).version: c for c in json.loads(result.stdout)["ips"]}
    assert sorted(configs) == ([4, 6] if family == "dual" else [6])
    v6 = configs[6]
    address = ipaddress.ip_interface(v6["address"])
    gateway = ipaddress.ip_address(v6["gateway"])
    assert address.network.prefixlen == 64 and gateway.version == 6
    assert address_on(ns, family="inet6") == [v6["address"]]
    if family == "dual":
        assert address_on(ns) == [configs[4]["address"]]
    # The route to the VPC's IPv6 block goes through the IPv6 gateway.
    assert cni.demo is not None
    routes = {r["dst"]: r.get("gateway") for r in ipv6_routes_in(ns)}
    assert routes.get(str(ipaddress.ip_network(cni.demo.ipv6_cidr))) == str(gateway), routes
    key = key_of(cni, container_id_of(ns))
    assert cni.keyed()[key] == str(address.ip)
    deleted = cni.cnitool("del", ns, netconf_dir=net_d)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert key not in cni.keyed()


def test_a_dual_stack_add_on_a_prefix_node_gets_an_address_of_a_28_and_one_of_the_80(cni: Cni) -> None:
    """cnitool's ADD on a node in prefix delegation: IPv4 from one of its /28 prefixes, IPv6 from its
    /80 with the /64 and the IPv6 gateway, both as EC2 delegated them; DEL gives both back."""
    assert cni.demo is not None
    instance_id = run_instance(cni.ec2, cni.demo, "m5.large")
    node = cni.api.create_node(
        instance_id=instance_id, instance_type="m5.large", ipv6_enabled=True, prefix_delegation=True
    )
    poll(lambda: cni.node_message(node).ipv6_prefix != "" and cni.api.stats(node).available_ips >= 16, timeout=30)
    interfaces = cni.ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
    )["NetworkInterfaces"]
    ipv4_prefixes = [ipaddress.ip_network(p["Ipv4Prefix"]) for i in interfaces for p in i.get("Ipv4Prefixes", [])]
    (ipv6_prefix,) = [ipaddress.ip_network(p["Ipv6Prefix"]) for i in interfaces for p in i.get("Ipv6Prefixes", [])]

    net_d = cni.write_conflist(cni.tmp / "net-prefix.d", "dual", node=node)
    ns = cni.add_netns()
    result = cni.cnitool("add", ns, netconf_dir=net_d)
    assert result.returncode == 0, result.stdout + result.stderr
    configs = {ipaddress.ip_interface(c["address"]).version: c for c in json.loads(result.stdout)["ips"]}
    v4, v6 = ipaddress.ip_interface(configs[4]["address"]), ipaddress.ip_interface(configs[6]["address"])
    assert any(v4.ip in p for p in ipv4_prefixes)
    assert v6.ip in ipv6_prefix and v6.network.prefixlen == 64 and configs[6]["gateway"] == "fe80:ec2::1"
    assert address_on(ns) == [configs[4]["address"]] and address_on(ns, family="inet6") == [configs[6]["address"]]
    key = key_of(cni, container_id_of(ns))
    assert cni.keyed(node)[key] in (str(v4.ip), str(v6.ip))
    deleted = cni.cnitool("del", ns, netconf_dir=net_d)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert cni.keyed(node) == {} and cni.api.dump(node) == ({}, {})


def test_a_failed_add_leaves_nothing_allocated_under_its_key(cni: Cni) -> None:
    """An IPv6 address whose interface has no IPv6 subnet reported: the plugin refuses the result,
    and gives back what it was handed before it answers."""
    node = cni.api.node_with_pool(v4=1, v6=1)
    conf = cni.plugin_conf(node=node, family="dual")
    result = cni.plugin("ADD", conf, "c-refused")
    assert result.returncode != 0 and "subnet" in error_of(result)["msg"], result.stdout
    assert cni.keyed(node) == {}
    assert cni.api.dump(node) == ({}, {})


def test_gc_frees_every_attachment_but_the_valid_ones(cni: Cni) -> None:
    ids = [f"gc-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    ips = {}
    for cid in ids:
        result = cni.plugin("ADD", cni.plugin_conf(), cid)
        assert result.returncode == 0, result.stdout
        ips[cid] = json.loads(result.stdout)["ips"][0]["address"].split("/")[0]
    other = cni.plugin("ADD", {**cni.plugin_conf(), "name": f"{cni.network}-other"}, ids[1])  # another network
    assert other.returncode == 0, other.stdout
    other_ip = json.loads(other.stdout)["ips"][0]["address"].split("/")[0]
    plain = cni.api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=cni.node, family=pb.FAMILY_IPV4, owner="not-cni"), timeout=5
    ).ipv4.ip

    # No list at all frees nothing.
    result = cni.plugin("GC", cni.plugin_conf(version="1.1.0"))
    assert result.returncode == 0, result.stdout
    assert {key_of(cni, c) for c in ids} <= set(cni.keyed())

    valid = [{"containerID": ids[0], "ifname": "eth0"}]
    result = cni.plugin("GC", cni.plugin_conf(version="1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert result.returncode == 0, result.stdout + result.stderr
    dump = cni.dump()
    assert dump.ipv4[ips[ids[0]]] == ids[0]
    assert ips[ids[1]] not in dump.ipv4 and ips[ids[2]] not in dump.ipv4
    assert dump.ipv4[other_ip] == ids[1] and dump.ipv4[plain] == "not-cni"
    assert [k for k in cni.keyed() if k.startswith(f"cni:{cni.network}/gc-")] == [key_of(cni, ids[0])]


def test_status_fails_with_50_while_the_allocator_is_stopped_and_passes_once_it_is_back(
    cni: Cni,
) -> None:
    port = free_port()
    own = AllocatorProcess(cni.redis_url, port=port).start()
    try:
        net_d = cni.tmp / f"status-{port}"
        net_d.mkdir()
        conflist = {
            "cniVersion": "1.1.0",
            "name": "ipcni-status",
            "plugins": [{"type": PLUGIN.name, "ipam": cni.ipam(address=own.address)}],
        }
        (net_d / "10-status.conflist").write_text(json.dumps(conflist))
        ns = "unused"  # STATUS acts on no namespace
        result = cni.cnitool("status", ns, netconf_dir=net_d, network="ipcni-status")
        assert result.returncode == 0, result.stdout + result.stderr
        own.stop()
        result = cni.cnitool("status", ns, netconf_dir=net_d, network="ipcni-status")
        assert result.returncode != 0
        assert "unreachable" in result.stderr, result.stderr  # cnitool prints the message, not the code
        status_conf = {
            "cniVersion": "1.1.0",
            "name": "ipcni-status",
            "type": PLUGIN.name,
            "ipam": cni.ipam(address=own.address),
        }
        direct = cni.plugin("STATUS", status_conf)
        assert direct.returncode != 0 and error_of(direct)["code"] == CODE_NOT_AVAILABLE, direct.stdout
        # The same failure, directly: an ADD now says "try again later".
        add = cni.plugin(
            "ADD", {**cni.plugin_conf(), "ipam": cni.ipam(address=own.address) | {"deadlineSeconds": 1}}, "c-down"
        )
        assert error_of(add)["code"] == CODE_TRY_AGAIN_LATER, add.stdout
        own.start()
        result = cni.cnitool("status", ns, netconf_dir=net_d, network="ipcni-status")
        assert result.returncode == 0, result.stdout + result.stderr
        assert cni.plugin("STATUS", status_conf).returncode == 0
    finally:
        own.stop()


def test_fifty_parallel_adds_on_one_node_get_distinct_addresses_as_dump_shows(cni: Cni) -> None:
    node = _fill_node(cni.api, cni.ec2, cni.demo, "m5.4xlarge", pre_allocate=50, pre_allocate_set=True)
    conf = cni.plugin_conf(node=node)
    ids = [f"par-{i}-{uuid.uuid4().hex[:8]}" for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda cid: cni.plugin("ADD", conf, cid), ids))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    ips = {cid: json.loads(r.stdout)["ips"][0]["address"].split("/")[0] for cid, r in zip(ids, results, strict=True)}
    assert len(set(ips.values())) == 50
    dump = cni.dump(node)
    assert {ip: dump.ipv4[ip] for ip in ips.values()} == {ip: cid for cid, ip in ips.items()}
    assert cni.keyed(node) == {key_of(cni, cid): ip for cid, ip in ips.items()}


def test_the_plugin_is_built_static_and_without_grpc_trace() -> None:
    """`make cni` builds for a short start: no dynamic loader or libc, no x/net/trace debug page."""
    if not os.access(PLUGIN, os.X_OK):
        pytest.fail(f"{PLUGIN} is missing: `make test` builds it (make cni)")
    build = subprocess.run(["go", "version", "-m", str(PLUGIN)], capture_output=True, text=True, check=True).stdout
    settings = dict(
        line.split()[1].split("=", 1) for line in build.splitlines() if line.split()[:1] == ["build"] and "=" in line
    )
    assert settings.get("CGO_ENABLED") == "0", build
    assert "grpcnotrace" in settings.get("-tags", "").split(","), build
    with PLUGIN.open("rb") as elf:
        assert b"/ld-linux" not in elf.read(4096), "the plugin asks for a dynamic loader"
