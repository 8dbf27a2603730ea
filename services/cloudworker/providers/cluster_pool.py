"""The cluster-pool provider: addresses without a cloud (Cilium's cluster-pool / multi-pool IPAM).

Blocks of IPv4 addresses (a /28: 16 addresses, what the allocator's pool takes as a prefix) are
carved on demand from cluster CIDRs kept in Redis, lowest free block first, each carve and each give
back one script (so two workers never hand out one block twice). A node holds its blocks of one
cluster CIDR on a virtual interface, as an EC2 instance holds its prefixes on an interface of one
subnet; it gets blocks on a deficit and gives back whole free blocks on excess, through the worker's
usual release handshake.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BLOCK_LENGTH = 28  # the allocator's pool takes IPv4 prefixes of this length only
_KEY_PREFIX = "ipam:cluster-pool"


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text()


class ClusterPoolSettings(BaseSettings):
    """The cluster-pool provider's settings (`IPAM_CLUSTER_POOL_CIDRS`, ...)."""

    model_config = SettingsConfigDict(env_prefix="IPAM_CLUSTER_POOL_", extra="ignore")

    cidrs: str = Field(
        "10.128.0.0/16",
        description="the cluster's IPv4 CIDRs, comma-separated, blocks carved from each in this order "
        "(every worker of the cluster names the same ones)",
    )
    block_length: int = Field(
        BLOCK_LENGTH, description="prefix length of a block; /28 (16 addresses) only, what the allocator's pool takes"
    )
    blocks_per_node: int = Field(16, ge=1, description="blocks a node holds at most from one cluster CIDR")

    @field_validator("block_length")
    @classmethod
    def _block_length(cls, value: int) -> int:
        if value != BLOCK_LENGTH:
            raise ValueError(f"block_length {value}: only /{BLOCK_LENGTH} blocks are supported")
        return value

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, value: str) -> str:
        networks = parse_cidrs(value)  # a ValueError names the bad one
        return ",".join(str(n) for n in networks)

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        """The cluster CIDRs, in order."""
        return parse_cidrs(self.cidrs)


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

    def __init__(self, client: Any, cluster: str) -> None:
        """`client`: a blocking Redis client (the provider's calls run in threads)."""
        self._client = client
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

    def give_back(self, cidr: ipaddress.IPv4Network, owner: str, indexes: Sequence[int]) -> list[Block]:
        """Gives back those of the blocks `indexes` of `cidr` that `owner` holds; returns them."""
        if not indexes:
            return []
        keys = [self._free_key(cidr), self._owners_key(cidr), self._owner_key(owner)]
        answer = self._give_back(keys=keys, args=[str(cidr), owner, *indexes])
        return [Block(cidr, int(i)) for i in answer]

    def blocks_of(self, owner: str) -> list[Block]:
        """The blocks `owner` holds, by CIDR and index."""
        blocks = []
        for member in self._client.smembers(self._owner_key(owner)):
            cidr, index = _text(member).split("|")
            blocks.append(Block(ipaddress.IPv4Network(cidr), int(index)))
        return sorted(blocks, key=lambda b: (int(b.cidr.network_address), b.index))

    def owners(self, cidr: ipaddress.IPv4Network) -> dict[int, str]:
        """Every carved block of `cidr` and its owner."""
        return {int(i): _text(o) for i, o in self._client.hgetall(self._owners_key(cidr)).items()}

    def free_blocks(self, cidr: ipaddress.IPv4Network) -> int:
        """Blocks of `cidr` that can still be carved."""
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(self._cursors_key, str(cidr))
        pipe.zcard(self._free_key(cidr))
        cursor, given_back = pipe.execute()
        return self.total_blocks(cidr) - int(cursor or 1) + int(given_back)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
