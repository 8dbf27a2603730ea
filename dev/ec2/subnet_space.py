"""One subnet CIDR's address map, as EC2 keeps it: which addresses are held, by what, and what is free.

Pure: built from what the interfaces of the subnet hold, it answers which single address or which
aligned block (a /28 IPv4 prefix, a /80 IPv6 prefix) may be handed out next. Addresses are kept as
integers. EC2 reserves the first four addresses of a subnet CIDR and its last.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

IPV4_PREFIX_LENGTH = 28
IPV6_PREFIX_LENGTH = 80
# How many random draws an automatic address gets before the lowest free one is taken instead.
_DRAWS = 64


@dataclass(frozen=True)
class SubnetSpace:
    """The addresses of one subnet CIDR: single ones held by interfaces, delegated prefixes, and the
    subnet's CIDR reservations (`prefix`: automatic prefixes come from there first; `explicit`: used
    only when an address or prefix inside is named). Neither kind of reservation gets automatic
    single addresses."""

    cidr: Network
    addresses: frozenset[int] = frozenset()
    prefixes: frozenset[Network] = frozenset()
    prefix_reservations: tuple[Network, ...] = ()
    explicit_reservations: tuple[Network, ...] = ()
    _prefix_starts: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prefix_starts", frozenset(int(p.network_address) for p in self.prefixes))

    @property
    def first(self) -> int:
        return int(self.cidr.network_address)

    @property
    def last(self) -> int:
        return int(self.cidr.broadcast_address)

    @property
    def prefix_length(self) -> int:
        """The length of the family's delegated prefixes: /28 for IPv4, /80 for IPv6."""
        return IPV4_PREFIX_LENGTH if self.cidr.version == 4 else IPV6_PREFIX_LENGTH

    def with_addresses(self, addresses: Iterable[int]) -> SubnetSpace:
        """This space with `addresses` held too."""
        return replace(self, addresses=self.addresses | frozenset(addresses))

    def with_prefixes(self, prefixes: Iterable[Network]) -> SubnetSpace:
        """This space with `prefixes` delegated too."""
        return replace(self, prefixes=self.prefixes | frozenset(prefixes))

    def reserved_by_ec2(self, address: int) -> bool:
        """The subnet's first four addresses and its last, which EC2 keeps for itself."""
        return self.first <= address < self.first + 4 or address == self.last

    def in_prefix(self, address: int) -> bool:
        """Whether a delegated prefix holds `address`."""
        return self._block_of(address) in self._prefix_starts

    def held(self, address: int) -> bool:
        """Whether an interface holds `address`, alone or in a prefix."""
        return address in self.addresses or self.in_prefix(address)

    def unusable_address(self, address: int) -> str | None:
        """Why `address` cannot be handed out when a caller names it (None: it can)."""
        if not self.first <= address <= self.last:
            return f"{self._text(address)} is not in subnet {self.cidr}"
        if self.reserved_by_ec2(address):
            return f"{self._text(address)} is reserved by EC2 in subnet {self.cidr}"
        if self.held(address):
            return f"{self._text(address)} is in use"
        return None

    def free_for_automatic_address(self, address: int) -> bool:
        """Whether EC2 may pick `address` by itself: usable, and outside every CIDR reservation."""
        return self.unusable_address(address) is None and not self._reserved(address)

    def pick_addresses(self, count: int, draw: Callable[[], int]) -> list[int] | None:
        """`count` addresses EC2 picks by itself (random draws, then the lowest free), or None when
        the subnet has fewer free."""
        picked: list[int] = []
        space = self
        for _ in range(count):
            address = space._pick_address(draw)
            if address is None:
                return None
            picked.append(address)
            space = space.with_addresses([address])
        return picked

    def unusable_prefix(self, prefix: Network) -> str | None:
        """Why `prefix`, named by a caller, cannot be delegated (None: it can)."""
        length = self.prefix_length
        if prefix.version != self.cidr.version or prefix.prefixlen != length or not prefix.subnet_of(self.cidr):  # type: ignore[arg-type]
            return f"{prefix} is not a /{length} inside subnet {self.cidr}"
        if not self._block_is_free(int(prefix.network_address), self._touched()):
            return f"{prefix} overlaps addresses in use or reserved"
        return None

    def pick_prefixes(self, count: int) -> list[Network] | None:
        """The `count` lowest free blocks for automatic prefixes, those inside `prefix` reservations
        first, or None when fewer are free (nothing is half assigned)."""
        picked = []
        for block in self._free_blocks():
            if len(picked) == count:
                break
            picked.append(block)
        return picked if len(picked) == count else None

    def available_count(self) -> int:
        """What EC2 answers as the subnet's available addresses: all but those it reserves, those
        held, and the free rest of `prefix` reservations."""
        ec2_reserved = (*range(self.first, self.first + 4), self.last)
        taken = len(ec2_reserved) + len(self.addresses) + sum(p.num_addresses for p in self.prefixes)
        for reservation in self.prefix_reservations:
            start, end = int(reservation.network_address), int(reservation.broadcast_address)
            counted = sum(1 for a in (*ec2_reserved, *self.addresses) if start <= a <= end)
            counted += sum(_overlap(reservation, p) for p in self.prefixes)
            taken += reservation.num_addresses - counted
        return self.cidr.num_addresses - taken

    def _pick_address(self, draw: Callable[[], int]) -> int | None:
        for _ in range(_DRAWS):
            address = draw()
            if self.free_for_automatic_address(address):
                return address
        return next((a for a in range(self.first, self.last + 1) if self.free_for_automatic_address(a)), None)

    def _free_blocks(self) -> Iterator[Network]:
        """Free blocks for prefixes, lowest first: inside `prefix` reservations, then the rest of
        the subnet."""
        length = self.prefix_length
        size = 1 << (self.cidr.max_prefixlen - length)
        touched = self._touched()
        seen: set[int] = set()
        for area in (*sorted(self.prefix_reservations), self.cidr):
            if area.prefixlen > length:
                continue
            for start in range(int(area.network_address), int(area.broadcast_address) + 1, size):
                if start not in seen and self._block_is_free(start, touched):
                    seen.add(start)
                    yield ipaddress.ip_network((start, length))

    def _block_is_free(self, start: int, touched: frozenset[int]) -> bool:
        """Whether the prefix-sized block at `start` is wholly free: no address EC2 reserves or an
        interface holds, no prefix, no `explicit` reservation."""
        end = start + (1 << (self.cidr.max_prefixlen - self.prefix_length)) - 1
        if start < self.first or end > self.last or self.reserved_by_ec2(start) or self.reserved_by_ec2(end):
            return False
        if start in touched or start in self._prefix_starts:
            return False
        return not any(_overlaps(start, end, r) for r in self.explicit_reservations)

    def _touched(self) -> frozenset[int]:
        """The starts of the blocks in which an interface holds a single address."""
        return frozenset(self._block_of(a) for a in self.addresses)

    def _block_of(self, address: int) -> int:
        host_bits = self.cidr.max_prefixlen - self.prefix_length
        return address >> host_bits << host_bits

    def _reserved(self, address: int) -> bool:
        return any(
            int(r.network_address) <= address <= int(r.broadcast_address)
            for r in (*self.prefix_reservations, *self.explicit_reservations)
        )

    def _text(self, address: int) -> str:
        return str(ipaddress.IPv4Address(address) if self.cidr.version == 4 else ipaddress.IPv6Address(address))


def _overlaps(start: int, end: int, network: Network) -> bool:
    return start <= int(network.broadcast_address) and int(network.network_address) <= end


def _overlap(a: Network, b: Network) -> int:
    """How many addresses two networks share (one holds the other, or none)."""
    if not a.overlaps(b):  # type: ignore[arg-type]
        return 0
    return min(a.num_addresses, b.num_addresses)
