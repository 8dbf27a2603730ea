"""One view of the cloud for every node this worker maintains (Cilium's `InstancesManager`).

A full refresh reads the whole of each VPC our nodes live in with a few paginated, filtered calls
(interfaces by VPC id, subnets, CIDRs and security groups once per VPC, instances in batches only
for those not seen before), so its cost does not grow with the number of nodes, apart from
pagination. Between refreshes each mutating call's answer updates the view, and a maintenance
plans from it. An instance is read alone only when the view cannot be trusted for it: it is older
than its bound, it disagrees with what the allocator was last told (another replica changed the
node), or the cloud refused a call as stale.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .model import Instance, NetworkInterface, SecurityGroup, Subnet
from .providers.base import CloudProvider

INSTANCE_BATCH = 200  # instance ids per DescribeInstances


@dataclass(frozen=True, slots=True)
class RefreshCost:
    """What one refresh read."""

    instances_described: int
    interfaces: int
    vpcs: int
    seconds: float


class CloudView:
    """What the cloud holds for our nodes' instances, as of the last refresh plus our own changes.
    Thread-safe (the provider runs in threads); values handed out are immutable."""

    def __init__(
        self, provider: CloudProvider, *, max_age_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.provider = provider
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._instances: dict[str, Instance] = {}
        self._interfaces: dict[str, tuple[float, list[NetworkInterface]]] = {}  # instance -> (read at, list)
        self._subnets: dict[str, Subnet] = {}
        self._subnets_read: set[tuple[str, str]] = set()  # (vpc, zone) read; zone "" = every zone
        self._vpc_cidrs: dict[str, list[str]] = {}
        self._security_groups: dict[str, list[SecurityGroup]] = {}
        self.refreshed_at: float | None = None

    # --- the full refresh (blocking: call it from a thread) ------------------------------------

    def refresh(self, instance_ids: Iterable[str]) -> RefreshCost:
        """Reads every VPC of these instances at once; instances not seen before are described."""
        started = self._clock()
        wanted = sorted(set(instance_ids) - {""})
        with self._lock:
            unseen = [i for i in wanted if i not in self._instances]
        described: list[Instance] = []
        for first in range(0, len(unseen), INSTANCE_BATCH):
            described += self.provider.describe_instances(unseen[first : first + INSTANCE_BATCH])
        with self._lock:
            self._instances.update((i.id, i) for i in described)
            vpcs = sorted({self._instances[i].vpc_id for i in wanted if i in self._instances})
        interfaces = 0
        for vpc_id in vpcs:
            subnets = self.provider.list_subnets(vpc_id)
            cidrs = self.provider.vpc_cidrs(vpc_id)
            groups = self.provider.list_security_groups(vpc_id)
            read_at = self._clock()
            by_instance: dict[str, list[NetworkInterface]] = {}
            for instance_id, interface in self.provider.list_vpc_interfaces(vpc_id):
                by_instance.setdefault(instance_id, []).append(interface)
                interfaces += 1
            with self._lock:
                self._subnets.update((s.id, s) for s in subnets)
                self._subnets_read.add((vpc_id, ""))
                self._vpc_cidrs[vpc_id] = cidrs
                self._security_groups[vpc_id] = groups
                for instance_id in wanted:
                    instance = self._instances.get(instance_id)
                    if instance is not None and instance.vpc_id == vpc_id:
                        listed = sorted(by_instance.get(instance_id, []), key=lambda i: i.device_index)
                        self._interfaces[instance_id] = (read_at, listed)
        self.refreshed_at = self._clock()
        return RefreshCost(len(unseen), interfaces, len(vpcs), self.refreshed_at - started)

    # --- reads ----------------------------------------------------------------------------------

    def age(self) -> float:
        """Seconds since the last full refresh (infinite before the first)."""
        return float("inf") if self.refreshed_at is None else self._clock() - self.refreshed_at

    def instance(self, instance_id: str) -> Instance | None:
        with self._lock:
            return self._instances.get(instance_id)

    def interfaces(self, instance_id: str) -> list[NetworkInterface] | None:
        """The instance's attached interfaces by device index; None when unknown or too old."""
        with self._lock:
            entry = self._interfaces.get(instance_id)
        if entry is None or self._clock() - entry[0] > self.max_age_seconds:
            return None
        return list(entry[1])

    def subnets(self, vpc_id: str, availability_zone: str) -> list[Subnet] | None:
        """The VPC's subnets of one zone; None before they were read or once too old."""
        if self.age() > self.max_age_seconds:
            return None
        with self._lock:
            if not {(vpc_id, ""), (vpc_id, availability_zone)} & self._subnets_read:
                return None
            return [
                s for s in self._subnets.values() if s.vpc_id == vpc_id and s.availability_zone == availability_zone
            ]

    def vpc_cidrs(self, vpc_id: str) -> list[str] | None:
        with self._lock:
            cidrs = self._vpc_cidrs.get(vpc_id)
        return list(cidrs) if cidrs is not None else None

    def security_groups(self, vpc_id: str) -> list[SecurityGroup] | None:
        if self.age() > self.max_age_seconds:
            return None
        with self._lock:
            groups = self._security_groups.get(vpc_id)
        return list(groups) if groups is not None else None

    def holders(self, vpc_id: str, ips: Iterable[str], but: str) -> set[str]:
        """Of `ips`, those another interface of the VPC holds, as far as the view knows."""
        wanted = set(ips)
        with self._lock:
            held: set[str] = set()
            for instance_id, (_, interfaces) in self._interfaces.items():
                instance = self._instances.get(instance_id)
                if instance is None or instance.vpc_id != vpc_id:
                    continue
                for interface in interfaces:
                    if interface.id != but:
                        held.update(ip for ip in (interface.primary_ip, *interface.ipv4) if ip in wanted)
            return held

    # --- what we learnt between refreshes ---------------------------------------------------------

    def put_instance(self, instance: Instance) -> None:
        with self._lock:
            self._instances[instance.id] = instance

    def put_vpc_cidrs(self, vpc_id: str, cidrs: list[str]) -> None:
        with self._lock:
            self._vpc_cidrs[vpc_id] = list(cidrs)

    def put_subnets(self, vpc_id: str, availability_zone: str, subnets: Iterable[Subnet]) -> None:
        """The subnets of a VPC's zone as just read."""
        with self._lock:
            self._subnets.update((s.id, s) for s in subnets)
            self._subnets_read.add((vpc_id, availability_zone))

    def spend(self, subnet_id: str, addresses: int) -> None:
        """`addresses` of the subnet were just taken (by an assign or a new interface)."""
        with self._lock:
            subnet = self._subnets.get(subnet_id)
            if subnet is not None:
                self._subnets[subnet_id] = replace(subnet, free_addresses=max(subnet.free_addresses - addresses, 0))

    def put_interfaces(self, instance_id: str, interfaces: Iterable[NetworkInterface]) -> None:
        """The instance's interfaces as just read from the cloud."""
        with self._lock:
            self._interfaces[instance_id] = (self._clock(), sorted(interfaces, key=lambda i: i.device_index))

    def put_interface(self, instance_id: str, interface: NetworkInterface) -> None:
        """One interface as a mutating call's answer left it (its entry keeps its age)."""
        with self._lock:
            read_at, current = self._interfaces.get(instance_id, (self._clock(), []))
            updated = [i for i in current if i.id != interface.id]
            if interface.device_index >= 0:
                updated.append(interface)
            self._interfaces[instance_id] = (read_at, sorted(updated, key=lambda i: i.device_index))

    def forget(self, instance_id: str) -> None:
        """The cloud refused a call as stale: the instance is read alone next time."""
        with self._lock:
            self._interfaces.pop(instance_id, None)
