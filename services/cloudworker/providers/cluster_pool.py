"""The cluster-pool provider: addresses without a cloud (Cilium's cluster-pool / multi-pool IPAM).

Blocks of IPv4 addresses (a /28: 16 addresses, what the allocator's pool takes as a prefix) are
carved on demand from cluster CIDRs kept in Redis, lowest free block first, each carve and each give
back one script (so two workers never hand out one block twice). A node holds its blocks of one
cluster CIDR on a virtual interface, as an EC2 instance holds its prefixes on an interface of one
subnet; it gets blocks on a deficit and gives back whole free blocks on excess, through the worker's
usual release handshake.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis
from pydantic import BaseModel, Field, field_validator

from services.cloudworker.metrics import ApiObserver, NullObserver
from services.cloudworker.model import (
    AddressChange,
    AllocationAction,
    AssignIPv6,
    Instance,
    InstanceLimits,
    NetworkInterface,
    NoAction,
    NodeSpec,
    ReleaseAction,
    SecurityGroup,
    Subnet,
    prefixes_addresses,
    usable_interfaces,
)
from services.cloudworker.providers.errors import NotFound, SubnetFull, Transient
from services.core.family import Family
from services.core.prefixes import ADDRESSES_PER_PREFIX, prefixes_for
from services.core.reasons import DeficitReason

BLOCK_LENGTH = 28  # the allocator's pool takes IPv4 prefixes of this length only
_KEY_PREFIX = "ipam:cluster-pool"


P = ParamSpec("P")
T = TypeVar("T")


def _redis_call(call: Callable[Concatenate[BlockStore, P], T]) -> Callable[Concatenate[BlockStore, P], T]:
    """Each call is reported to the store's observer as the cloud's API calls are (its name the
    operation, "OK" or the error's class the code). A Redis that fails or does not answer is a
    `Transient` failure of the call (a carve that timed out may have happened: the maintenance
    reads the node's blocks again)."""

    @functools.wraps(call)
    def wrapped(store: BlockStore, *args: P.args, **kwargs: P.kwargs) -> T:
        started, code = time.perf_counter(), "OK"
        try:
            return call(store, *args, **kwargs)
        except redis.exceptions.RedisError as exc:
            code = type(exc).__name__
            raise Transient(f"{call.__name__}: {exc}", code=code, operation=call.__name__) from exc
        finally:
            store.observer.observe_api_call(call.__name__, code, time.perf_counter() - started)

    return wrapped


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


class ClusterPoolSettings(BaseModel):
    """The cluster-pool provider's settings, taken in by the worker's (`IPAM_CLUSTER_POOL_CIDRS`, ...)."""

    cluster_pool_cidrs: str = Field(
        "10.128.0.0/16",
        description="cluster-pool: the cluster's IPv4 CIDRs, comma-separated, blocks carved from each in this "
        "order (every worker of the cluster names the same ones)",
    )
    cluster_pool_block_length: int = Field(
        BLOCK_LENGTH,
        description="cluster-pool: a block's prefix length; 28 (16 addresses) only, what the allocator's pool takes",
    )
    cluster_pool_blocks_per_node: int = Field(
        16, ge=1, description="cluster-pool: blocks a node holds at most from one cluster CIDR"
    )

    @field_validator("cluster_pool_block_length")
    @classmethod
    def _block_length(cls, value: int) -> int:
        if value != BLOCK_LENGTH:
            raise ValueError(f"block length {value}: only /{BLOCK_LENGTH} blocks are supported")
        return value

    @field_validator("cluster_pool_cidrs")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        networks = parse_cidrs(value)  # a ValueError names the bad one
        return ",".join(str(n) for n in networks)

    @property
    def cluster_pool_networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        """The cluster CIDRs, in order."""
        return parse_cidrs(self.cluster_pool_cidrs)


def parse_cidrs(value: str) -> tuple[ipaddress.IPv4Network, ...]:
    """Cluster CIDRs from "a/n,b/m": canonical IPv4 networks of at least two blocks, none overlapping."""
    networks: list[ipaddress.IPv4Network] = []
    for text in (part.strip() for part in value.split(",")):
        if not text:
            continue
        network = ipaddress.ip_network(text, strict=True)
        if not isinstance(network, ipaddress.IPv4Network):
            raise ValueError(f"{text}: a cluster CIDR is IPv4")
        if network.prefixlen > BLOCK_LENGTH - 1:
            raise ValueError(
                f"{text}: a cluster CIDR holds at least two /{BLOCK_LENGTH} blocks (block 0 is not carved)"
            )
        for other in networks:
            if network.overlaps(other):
                raise ValueError(f"cluster CIDRs {other} and {network} overlap")
        networks.append(network)
    if not networks:
        raise ValueError("no cluster CIDR")
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class Block:
    """One carved block: its cluster CIDR and its index in it (block i starts at the CIDR's address
    i × 16)."""

    cidr: ipaddress.IPv4Network
    index: int

    @property
    def prefix(self) -> str:
        """The block as a prefix, "10.128.0.16/28"."""
        size = 2 ** (32 - BLOCK_LENGTH)
        return f"{self.cidr.network_address + self.index * size}/{BLOCK_LENGTH}"


def block_of(cidr: ipaddress.IPv4Network, prefix: str) -> Block:
    """The block `prefix` of `cidr`; ValueError if it is not a block of it."""
    network = ipaddress.IPv4Network(prefix, strict=True)
    if network.prefixlen != BLOCK_LENGTH or not network.subnet_of(cidr):
        raise ValueError(f"{prefix} is not a /{BLOCK_LENGTH} block of {cidr}")
    offset = int(network.network_address) - int(cidr.network_address)
    return Block(cidr, offset // 2 ** (32 - BLOCK_LENGTH))


class BlockStore:
    """The cluster CIDRs and their carved blocks, kept in Redis for every worker of the cluster.

    Every key of a cluster shares one hash tag, so the scripts run on one node of a Redis Cluster.
    A block's owner is the node's instance (the name the worker maintains it by)."""

    def __init__(self, client: Any, cluster: str, *, observer: ApiObserver | None = None) -> None:
        """`client`: a blocking Redis client (the provider's calls run in threads); `observer`: where
        each call is reported (the worker's cloud metrics)."""
        self._client = client
        self.observer: ApiObserver = observer or NullObserver()
        tag = f"{_KEY_PREFIX}:{{{cluster}}}"
        self._cidrs_key = f"{tag}:cidrs"
        self._cursors_key = f"{tag}:cursors"
        self._tag = tag
        self._carve = client.register_script(_script("cluster_pool_carve"))
        self._give_back = client.register_script(_script("cluster_pool_give_back"))

    def _free_key(self, cidr: ipaddress.IPv4Network) -> str:
        return f"{self._tag}:free:{cidr}"

    def _owners_key(self, cidr: ipaddress.IPv4Network) -> str:
        return f"{self._tag}:owners:{cidr}"

    def _owner_key(self, owner: str) -> str:
        return f"{self._tag}:owner:{owner}"

    def register(self, cidrs: Sequence[ipaddress.IPv4Network]) -> None:
        """Keeps `cidrs` as cluster CIDRs (those already kept stay as they are). ValueError when one
        overlaps a different CIDR another worker registered: their blocks would overlap."""
        kept = [ipaddress.IPv4Network(c) for c in self.registered()]
        for cidr in cidrs:
            for other in kept:
                if cidr != other and cidr.overlaps(other):
                    raise ValueError(f"cluster CIDR {cidr} overlaps {other}, which Redis keeps for this cluster")
        for cidr in cidrs:
            self._client.hsetnx(self._cidrs_key, str(cidr), BLOCK_LENGTH)

    def registered(self) -> list[str]:
        """The cluster CIDRs Redis keeps."""
        return sorted(_text(c) for c in self._client.hkeys(self._cidrs_key))

    @staticmethod
    def total_blocks(cidr: ipaddress.IPv4Network) -> int:
        """Blocks in `cidr`, block 0 included."""
        return 2 ** (BLOCK_LENGTH - cidr.prefixlen)

    @_redis_call
    def carve(self, cidr: ipaddress.IPv4Network, owner: str, count: int) -> list[Block]:
        """`count` blocks of `cidr` for `owner`, lowest free first, all or none ([] when fewer are
        free). ValueError when `cidr` is not registered."""
        if count <= 0:
            return []
        keys = [
            self._cidrs_key,
            self._cursors_key,
            self._free_key(cidr),
            self._owners_key(cidr),
            self._owner_key(owner),
        ]
        answer = self._carve(keys=keys, args=[str(cidr), self.total_blocks(cidr), count, owner])
        if answer == -1:
            raise ValueError(f"{cidr} is not a cluster CIDR kept in Redis")
        return [Block(cidr, int(i)) for i in answer]

    @_redis_call
    def give_back(self, cidr: ipaddress.IPv4Network, owner: str, indexes: Sequence[int]) -> list[Block]:
        """Gives back those of the blocks `indexes` of `cidr` that `owner` holds; returns them."""
        if not indexes:
            return []
        keys = [self._free_key(cidr), self._owners_key(cidr), self._owner_key(owner)]
        answer = self._give_back(keys=keys, args=[str(cidr), owner, *indexes])
        return [Block(cidr, int(i)) for i in answer]

    @_redis_call
    def blocks_of(self, owner: str) -> list[Block]:
        """The blocks `owner` holds, by CIDR and index."""
        blocks = []
        for member in self._client.smembers(self._owner_key(owner)):
            cidr, index = _text(member).split("|")
            blocks.append(Block(ipaddress.IPv4Network(cidr), int(index)))
        return sorted(blocks, key=lambda b: (int(b.cidr.network_address), b.index))

    @_redis_call
    def owners(self, cidr: ipaddress.IPv4Network) -> dict[int, str]:
        """Every carved block of `cidr` and its owner."""
        return {int(i): _text(o) for i, o in self._client.hgetall(self._owners_key(cidr)).items()}

    @_redis_call
    def free_blocks(self, cidr: ipaddress.IPv4Network) -> int:
        """Blocks of `cidr` that can still be carved."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(self._cursors_key, str(cidr))
        pipe.zcard(self._free_key(cidr))
        cursor, given_back = pipe.execute()
        return self.total_blocks(cidr) - int(cursor or 1) + int(given_back)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClusterPoolPolicy:
    """The cluster pool's choices for a step (`CloudPolicy`); pure. A node's virtual interface of
    cluster CIDR i sits at device index i and holds up to `blocks_per_node` blocks."""

    def __init__(self, cidrs: Sequence[ipaddress.IPv4Network]) -> None:
        self.cidrs = tuple(cidrs)

    def node_instance(self, node: str, instance_id: str, instance_type: str) -> tuple[str, str] | None:
        """The node is its own instance (the spec's instance id, if it names one, else its name):
        it owns its blocks; the type means nothing here."""
        return (instance_id or node, instance_type)

    def device_index(self, subnet_id: str) -> int:
        """The device index of the virtual interfaces of cluster CIDR `subnet_id`; -1 for no such CIDR."""
        names = [str(c) for c in self.cidrs]
        return names.index(subnet_id) if subnet_id in names else -1

    def prepare_allocation(
        self,
        spec: NodeSpec,
        wanted: int,
        interfaces: Sequence[NetworkInterface],
        limits: InstanceLimits,
        subnets: Sequence[Subnet],
        tagged_security_groups: Sequence[str] = (),
        no_prefix_room: Collection[str] = (),
    ) -> AllocationAction | NoAction:
        """⌈wanted / 16⌉ blocks: on the node's lowest virtual interface with room in a CIDR with free
        blocks, else on a new one in the first CIDR the node may use (the spec's subnet ids, when it
        names some) with free blocks."""
        slots = limits.ipv4_per_interface - 1  # a virtual interface has no primary address
        free_blocks = {s.id: s.free_addresses // ADDRESSES_PER_PREFIX for s in subnets}
        full = False
        held: set[str] = set()  # the CIDRs the node has an interface in
        for interface in sorted(interfaces, key=lambda i: i.device_index):
            held.add(interface.subnet_id)
            room = slots - interface.ipv4_count
            if interface.device_index < spec.first_interface_index or room <= 0:
                continue
            blocks = min(prefixes_for(wanted, room), free_blocks.get(interface.subnet_id, 0))
            if blocks <= 0:
                full = True
                continue
            return AllocationAction(
                count=0,
                prefixes=blocks,
                subnet_id=interface.subnet_id,
                device_index=interface.device_index,
                interface_id=interface.id,
            )
        for subnet in subnets:
            index = self.device_index(subnet.id)
            if subnet.id in held or index < spec.first_interface_index:
                continue
            if spec.subnet_ids and subnet.id not in spec.subnet_ids:
                continue
            blocks = min(prefixes_for(wanted, slots), free_blocks[subnet.id])
            if blocks <= 0:
                full = True
                continue
            return AllocationAction(count=0, prefixes=blocks, subnet_id=subnet.id, device_index=index)
        if full:
            return NoAction(DeficitReason.SUBNET_FULL, "no cluster CIDR the node may use has a free block")
        return NoAction(DeficitReason.AT_CAPACITY, f"{limits.ipv4_per_interface - 1} blocks per cluster CIDR, all held")

    def prepare_release(
        self,
        spec: NodeSpec,
        interfaces: Sequence[NetworkInterface],
        free: Collection[str],
        excess: int,
        family: Family,
    ) -> ReleaseAction | NoAction:
        """A whole block whose 16 addresses are free, the highest first (the CIDR stays packed at its
        start); none while the excess is below a block."""
        if family is Family.IPV4 and excess >= ADDRESSES_PER_PREFIX:
            candidates = [
                (interface.device_index, int(ipaddress.IPv4Network(prefix).network_address), interface, prefix)
                for interface in usable_interfaces(interfaces, spec.first_interface_index)
                for prefix in interface.whole_prefixes(free)
            ]
            if candidates:
                _, _, interface, prefix = max(candidates, key=lambda c: (c[0], c[1]))
                return ReleaseAction(interface.id, interface.subnet_id, ADDRESSES_PER_PREFIX, family, prefix=prefix)
        return NoAction(DeficitReason.NOTHING_RELEASABLE, f"{excess} in excess, no whole block free to give back")

    def prepare_ipv6_allocation(
        self, spec: NodeSpec, interfaces: Sequence[NetworkInterface], limits: InstanceLimits, wanted: int
    ) -> AssignIPv6 | None:
        """None: the cluster pool holds IPv4 only."""
        return None


class ClusterPoolProvider(ClusterPoolPolicy):
    """The cluster pool as a `CloudProvider`: its calls read and change the blocks in Redis. A
    node's instance (its spec's instance id, else its name) owns its blocks; the cluster is its
    only "VPC", each cluster CIDR a "subnet". Thread-safe: the Redis client is."""

    def __init__(self, blocks: BlockStore, settings: ClusterPoolSettings, *, cluster: str) -> None:
        super().__init__(settings.cluster_pool_networks)
        self.blocks = blocks
        self.cluster = cluster
        self.blocks_per_node = settings.cluster_pool_blocks_per_node

    # The node and its interfaces.

    def interface_id(self, owner: str, cidr: ipaddress.IPv4Network) -> str:
        """The id of `owner`'s virtual interface of `cidr`."""
        return f"cp{self.cidrs.index(cidr)}-{owner}"

    def _parse_interface_id(self, interface_id: str) -> tuple[ipaddress.IPv4Network, str]:
        head, _, owner = interface_id.partition("-")
        index = head.removeprefix("cp")
        if not head.startswith("cp") or not index.isdigit() or int(index) >= len(self.cidrs) or not owner:
            raise NotFound(f"no virtual interface {interface_id}", code="InterfaceNotFound")
        return self.cidrs[int(index)], owner

    def _interface(self, owner: str, cidr: ipaddress.IPv4Network, blocks: Sequence[Block]) -> NetworkInterface:
        return NetworkInterface(
            id=self.interface_id(owner, cidr),
            mac="",
            device_index=self.cidrs.index(cidr),
            subnet_id=str(cidr),
            subnet_cidr=str(cidr),
            primary_ip="",
            ipv4_prefixes=tuple(b.prefix for b in sorted(blocks, key=lambda b: b.index)),
            status="in-use",
        )

    def _interfaces(self, owner: str, blocks: Sequence[Block]) -> list[NetworkInterface]:
        return [
            self._interface(owner, cidr, held) for cidr in self.cidrs if (held := [b for b in blocks if b.cidr == cidr])
        ]

    def _read_interface(self, interface_id: str) -> NetworkInterface:
        cidr, owner = self._parse_interface_id(interface_id)
        return self._interface(owner, cidr, [b for b in self.blocks.blocks_of(owner) if b.cidr == cidr])

    def instance_limits(self, instance_type: str) -> InstanceLimits:
        """One virtual interface per cluster CIDR, each of `blocks_per_node` blocks (plus the slot
        of a primary address, which capacity formulas leave out), whatever the type."""
        return InstanceLimits(
            max_interfaces=len(self.cidrs), ipv4_per_interface=self.blocks_per_node + 1, prefix_capable=True
        )

    def describe_instance(self, instance_id: str) -> Instance:
        """Any node: no zone, the cluster as its VPC, its first CIDR as its subnet."""
        return Instance(instance_id, "", "", self.cluster, str(self.cidrs[0]))

    def describe_instances(self, instance_ids: Sequence[str]) -> list[Instance]:
        return [self.describe_instance(i) for i in instance_ids]

    def list_vpc_interfaces(self, vpc_id: str) -> list[tuple[str, NetworkInterface]]:
        """Every node's virtual interfaces, read from the CIDRs' owners."""
        by_owner: dict[str, list[Block]] = {}
        for cidr in self.cidrs:
            for index, owner in self.blocks.owners(cidr).items():
                by_owner.setdefault(owner, []).append(Block(cidr, index))
        return [(owner, i) for owner, blocks in sorted(by_owner.items()) for i in self._interfaces(owner, blocks)]

    def list_subnets(self, vpc_id: str, availability_zone: str = "") -> list[Subnet]:
        """The cluster CIDRs, in order, with their free blocks' addresses."""
        return [
            Subnet(str(c), self.cluster, availability_zone, str(c), self.blocks.free_blocks(c) * ADDRESSES_PER_PREFIX)
            for c in self.cidrs
        ]

    def list_security_groups(self, vpc_id: str) -> list[SecurityGroup]:
        return []

    def list_interfaces(self, instance_id: str) -> list[NetworkInterface]:
        return self._interfaces(instance_id, self.blocks.blocks_of(instance_id))

    def vpc_cidrs(self, vpc_id: str) -> list[str]:
        return [str(c) for c in self.cidrs]

    # Changes: each one script in Redis, all or none.

    def _carve(self, cidr: ipaddress.IPv4Network, owner: str, count: int) -> list[Block]:
        try:
            carved = self.blocks.carve(cidr, owner, count)
        except ValueError as exc:
            raise NotFound(str(exc), code="CidrNotFound") from None
        if not carved:
            raise SubnetFull(f"cluster CIDR {cidr} has fewer than {count} free block(s)", code="NoFreeBlock")
        return carved

    def create_interface(
        self,
        *,
        instance_id: str,
        node: str,
        subnet_id: str,
        security_group_ids: Sequence[str],
        device_index: int,
        ipv4_count: int,
        ipv4_prefix_count: int = 0,
    ) -> NetworkInterface:
        """The node's virtual interface of cluster CIDR `subnet_id` with its first blocks
        (`ipv4_prefix_count`, else enough for `ipv4_count` addresses)."""
        cidr = next((c for c in self.cidrs if str(c) == subnet_id), None)
        if cidr is None:
            raise NotFound(f"{subnet_id} is not a cluster CIDR", code="CidrNotFound")
        self._carve(cidr, instance_id, ipv4_prefix_count or prefixes_for(ipv4_count, self.blocks_per_node))
        return self._read_interface(self.interface_id(instance_id, cidr))

    def assign_prefixes(self, interface_id: str, count: int, *, known: NetworkInterface | None = None) -> AddressChange:
        cidr, owner = self._parse_interface_id(interface_id)
        new = tuple(b.prefix for b in self._carve(cidr, owner, count))
        return AddressChange(prefixes_addresses(new), self._read_interface(interface_id), new)

    def assign_addresses(
        self, interface_id: str, count: int, family: Family = Family.IPV4, *, known: NetworkInterface | None = None
    ) -> AddressChange:
        """IPv4 comes in whole blocks (enough for `count`); IPv6 not at all (an empty change)."""
        if family is Family.IPV6:
            return AddressChange((), known or self._read_interface(interface_id))
        return self.assign_prefixes(interface_id, prefixes_for(count, self.blocks_per_node), known=known)

    def unassign_prefixes(
        self, interface_id: str, prefixes: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        cidr, owner = self._parse_interface_id(interface_id)
        indexes = []
        for prefix in prefixes:
            try:
                indexes.append(block_of(cidr, prefix).index)
            except ValueError:
                continue  # not a block of this interface: not held, nothing to give back
        gone = tuple(b.prefix for b in self.blocks.give_back(cidr, owner, indexes))
        return AddressChange(prefixes_addresses(gone), self._read_interface(interface_id), gone)

    def unassign_addresses(
        self, interface_id: str, ips: Sequence[str], *, known: NetworkInterface | None = None
    ) -> AddressChange:
        """An address goes back only with its whole block: the blocks all of whose addresses are
        among `ips`."""
        wanted = set(ips)
        interface = known or self._read_interface(interface_id)
        whole = interface.whole_prefixes(wanted)
        return self.unassign_prefixes(interface_id, whole, known=interface)

    def conflicting_addresses(self, interface: NetworkInterface, ips: Sequence[str]) -> set[str]:
        """None: a block is carved once, in one script."""
        return set()

    def list_leaked_interfaces(
        self, older_than_seconds: float, node_instances: Collection[str] | None = None
    ) -> list[NetworkInterface]:
        """The virtual interfaces of owners that are no node's instance (a node deleted with its
        blocks); none while the nodes are unknown."""
        if node_instances is None:
            return []
        return [i for owner, i in self.list_vpc_interfaces(self.cluster) if owner not in node_instances]

    def delete_interface(self, interface_id: str) -> bool:
        """Gives back every block of the virtual interface; False if it held none."""
        interface = self._read_interface(interface_id)
        return bool(self.unassign_prefixes(interface_id, interface.ipv4_prefixes).prefixes)


def from_settings(
    settings: ClusterPoolSettings, *, cluster: str, redis: Any, observer: ApiObserver | None = None
) -> ClusterPoolProvider:
    """The worker's cluster-pool provider, its blocks in `redis` (the worker's, a blocking client),
    its CIDRs registered there; its calls reported to `observer`."""
    blocks = BlockStore(redis, cluster, observer=observer)
    blocks.register(settings.cluster_pool_networks)
    return ClusterPoolProvider(blocks, settings, cluster=cluster)


def describe(settings: ClusterPoolSettings) -> str:
    """The start-up log's words for this provider: its CIDRs and blocks."""
    return (
        f"/{settings.cluster_pool_block_length} blocks from {settings.cluster_pool_cidrs}, "
        f"up to {settings.cluster_pool_blocks_per_node} per node and CIDR"
    )
