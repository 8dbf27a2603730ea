"""Per-node pool maintenance (Cilium's `Node.MaintainIPPool`, pkg/ipam/node.go): make the cloud
and the allocator agree, then read the state, decide the next step (`planner.decide`, with the
provider's policy), apply it through the provider, and again, until the pool is at its watermark,
the node is full, or nothing can be done. The cloud is reconciled with the pool before the first
step and after every refusal, so a duplicate event or a crash part-way never assigns addresses
twice: what is already attached is found and handed to the allocator first."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from services.core.family import Family
from services.core.prefixes import ADDRESSES_PER_PREFIX
from services.core.reasons import BLOCKING_REASONS, DeficitReason

from . import planner
from .allocator_client import AllocatorClient, AllocatorError, NodeConfig, PoolAddresses, PoolNode, Reservation
from .cloud_view import CloudView
from .metrics import WorkerMetrics
from .model import Instance, InstanceLimits, NetworkInterface, SecurityGroup, Subnet, prefixes_addresses
from .providers.base import CloudProvider
from .providers.errors import LimitExceeded, NoPrefixRoom, NotFound, ProviderError, SubnetFull, Transient
from .ratelimit import Priority, current_priority

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ROUNDS = 12  # steps of one maintenance (reads it asks for not counted)
DEFAULT_VIEW_AGE_S = 120.0  # a view entry older than this is read again before it is used
SECURITY_GROUPS_TTL_S = 60.0  # security groups looked up by tags are read again after this (Cilium: each resync)
DEFAULT_PREFIX_BACKOFF_S = 120.0  # a subnet without a free /28 gets no prefix request for this long


@dataclass
class Outcome:
    """What one maintenance did."""

    node: str
    assigned: int = 0
    released: int = 0
    interfaces_created: int = 0
    reason: str = ""  # the planner's last NoAction reason
    detail: str = ""  # what a blocking reason is about, for the node's last error
    notice: str = ""  # what the node asked for and cannot have, kept as its last error when nothing blocks
    cloud_seconds: float = 0.0  # time spent in cloud calls
    seconds: float = 0.0  # total time
    actions: list[str] = field(default_factory=list)


@dataclass
class _Maintenance:
    """What one maintenance has read and learnt so far; each round's `planner.NodeState` is made
    from it. None means "read it (again)"."""

    node: PoolNode
    instance: Instance
    limits: InstanceLimits
    cidrs: list[str]
    plan_spec: planner.NodeSpec
    pool: PoolAddresses | None  # the Dump read with the node, for the first reconcile
    first_read: list[NetworkInterface] | None  # the interfaces read (or viewed) with the node
    settle_reservations: bool
    interfaces: list[NetworkInterface] | None = None  # reconciled with the pool
    subnets: list[Subnet] | None = None
    full_subnets: set[str] = field(default_factory=set)  # refused as full in this maintenance
    allocated_ipv4: frozenset[str] | None = None  # from a Dump the decision asked for
    free_ipv6: frozenset[str] | None = None
    tagged_security_groups: tuple[str, ...] | None = None
    progress: planner.Progress = field(default_factory=planner.Progress)  # the way it went, what came back empty
    ambiguous_seen: bool = False  # a mutating call whose outcome is unknown was answered once already
    released_some: bool = False  # AddAddresses keeps the allocator's interface table; a release does not


def planner_spec(spec: NodeConfig, instance: Instance, *, prefix_delegation: bool = False) -> planner.NodeSpec:
    """What planning needs of the node's spec, the instance filling in what the spec leaves open
    (`prefix_delegation`: the worker's default, for a spec that leaves it unset)."""
    return planner.NodeSpec(
        watermarks=spec.watermarks,
        first_interface_index=spec.first_interface_index,
        subnet_ids=spec.subnet_ids,
        subnet_tags=dict(spec.subnet_tags),
        security_group_ids=spec.security_group_ids or instance.security_group_ids,
        security_group_tags={} if spec.security_group_ids else dict(spec.security_group_tags),  # ids win
        vpc_id=spec.vpc_id or instance.vpc_id,
        availability_zone=spec.availability_zone or instance.availability_zone,
        release_excess=spec.release_excess,
        prefix_delegation=prefix_delegation if spec.prefix_delegation is None else spec.prefix_delegation,
    )


def priority_of(node: PoolNode) -> Priority:
    """A pool short of addresses (or with callers waiting) is refilled first, excess comes next."""
    stats = node.stats
    if stats.needed_ipv4 > 0 or stats.needed_ipv6 > 0 or stats.waiting_ipv4 > 0:
        return Priority.REFILL
    if stats.excess_ipv4 > 0 or stats.excess_ipv6 > 0:
        return Priority.EXCESS
    return Priority.HOUSEKEEPING


class NodeMaintainer:
    """Brings one node's pool to its watermark against the cloud."""

    def __init__(
        self,
        provider: CloudProvider,
        allocator: AllocatorClient,
        metrics: WorkerMetrics,
        *,
        stale_reservation_seconds: float,
        check_conflicts: bool = True,
        excess_release_delay_seconds: float = 0.0,
        view: CloudView | None = None,
        prefix_delegation: bool = False,
        prefix_backoff_seconds: float = DEFAULT_PREFIX_BACKOFF_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`view`: the cloud view shared with the resync (one of its own, never refreshed, if none);
        `prefix_delegation`: the default of nodes whose spec leaves it unset; `prefix_backoff_seconds`:
        how long a subnet that had no free /28 is asked for none (secondaries meanwhile), by `clock`."""
        self.provider = provider
        self.view = view or CloudView(provider, max_age_seconds=DEFAULT_VIEW_AGE_S)
        self.excess_release_delay_s = excess_release_delay_seconds
        self._excess_since: dict[str, float] = {}  # node -> when its pool was first seen in excess
        self.check_conflicts = check_conflicts
        self.allocator = allocator
        self.metrics = metrics
        self.stale_reservation_ms = int(stale_reservation_seconds * 1000)
        self._node_instances: dict[str, str] = {}  # node name -> instance id, as last seen
        self._security_groups: dict[str, tuple[float, list[SecurityGroup]]] = {}  # vpc -> (read at, groups)
        self.prefix_delegation = prefix_delegation
        self.prefix_backoff_s = prefix_backoff_seconds
        self._clock = clock
        self._no_prefix_room_until: dict[str, float] = {}  # subnet -> when prefixes are asked of it again

    async def _cloud(self, outcome: Outcome, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        finally:
            outcome.cloud_seconds += time.perf_counter() - started

    async def maintain(self, name: str, *, settle_reservations: bool = False) -> Outcome:
        """Maintains node `name`; returns what was done. Raises ProviderError / AllocatorError.

        Read the state (the pool from the allocator, the cloud from the view or a read), decide the
        next step (`planner.decide`, pure, with the provider's policy), apply it through the
        provider, and again, until nothing is left to do or `MAX_ROUNDS` steps were taken (the budget
        of one maintenance: what is left waits for the next event or resync)."""
        started = time.perf_counter()
        outcome = Outcome(name)
        m = await self._setup(name, outcome, settle_reservations)
        if m is None:
            return outcome
        steps = 0
        while steps < MAX_ROUNDS:
            step = planner.decide(await self._read_state(m, outcome), self.provider)
            if isinstance(step, planner.NoAction):
                outcome.reason, outcome.detail = step.reason, step.detail
                break
            if not isinstance(step, planner.ReadPool | planner.ReadSecurityGroups):
                steps += 1  # a read asked for is answered once (it fills the state): not a step
            await self._apply(m, step, outcome)
        await self._report(m.node, m.interfaces if m.released_some else None, outcome)
        outcome.seconds = time.perf_counter() - started
        if outcome.assigned:
            self.metrics.own_overhead.observe(max(outcome.seconds - outcome.cloud_seconds, 0.0))
        return outcome

    async def _setup(self, name: str, outcome: Outcome, settle_reservations: bool) -> _Maintenance | None:
        """The node, its pool, its instance, the type's limits and the VPC's CIDRs; None (with the
        reason in `outcome`, told to the allocator) when the node cannot be maintained."""
        # A node seen before and not in the view: its interfaces are read while the allocator
        # answers, not after.
        known_instance = self._node_instances.get(name)
        first_read: list[NetworkInterface] | None = None
        if known_instance and self.view.interfaces(known_instance) is None:
            node, pool, first_read = await asyncio.gather(
                self.allocator.get_node(name),
                self.allocator.dump(name),
                self._cloud(outcome, self.provider.list_interfaces, known_instance),
            )
        else:
            node, pool = await asyncio.gather(self.allocator.get_node(name), self.allocator.dump(name))
        # From here on the node's own need sets the priority of its cloud calls: refills first.
        current_priority.set(priority_of(node))
        spec = node.config
        found = self.provider.node_instance(name, spec.instance_id, spec.instance_type)
        if found is None:
            outcome.reason = DeficitReason.NO_INSTANCE
            outcome.detail = "the node's spec names no instance id or type"
            await self._report(node, None, outcome)
            return None
        instance_id, instance_type = found
        if instance_id != known_instance:
            first_read = None
        if first_read is not None:
            self.view.put_interfaces(instance_id, first_read)
        else:
            first_read = self._viewed_interfaces(node, instance_id, pool)
        self._node_instances[name] = instance_id
        try:
            limits = await self._cloud(outcome, self.provider.instance_limits, instance_type)
        except NotFound as exc:
            # Said to the allocator, so that callers fail at once with the reason instead of
            # waiting for a refill that cannot come (Cilium #14802: unknown types failing silently).
            log.warning("node %s: %s", name, exc)
            outcome.reason, outcome.detail = DeficitReason.INSTANCE_TYPE_UNKNOWN, str(exc)
            await self._report(node, None, outcome)
            return None
        try:
            instance = self.view.instance(instance_id) or await self._cloud(
                outcome, self.provider.describe_instance, instance_id
            )
        except NotFound as exc:
            # The same for an instance the cloud does not know (InvalidInstanceID.NotFound): callers
            # fail at once, and the node shows why, instead of a refill requested forever.
            log.warning("node %s: %s", name, exc)
            outcome.reason, outcome.detail = DeficitReason.INSTANCE_NOT_FOUND, str(exc)
            await self._report(node, None, outcome)
            return None
        self.view.put_instance(instance)
        cidrs = self.view.vpc_cidrs(instance.vpc_id)
        if cidrs is None:
            cidrs = await self._cloud(outcome, self.provider.vpc_cidrs, instance.vpc_id)
            self.view.put_vpc_cidrs(instance.vpc_id, cidrs)
        plan_spec = planner_spec(spec, instance, prefix_delegation=self.prefix_delegation)
        if plan_spec.prefix_delegation and not limits.prefix_capable:
            # The policy plans secondaries for such a type: no prefix call EC2 is bound to refuse.
            outcome.notice = (
                f"{DeficitReason.PREFIX_DELEGATION_UNSUPPORTED}: {spec.instance_type} takes no prefixes "
                "(not a Nitro instance type): secondary addresses instead"
            )
        if plan_spec.release_excess and not self._excess_due(name, node):
            plan_spec = replace(plan_spec, release_excess=False)  # not yet: the next resync looks again
        return _Maintenance(
            node=node,
            instance=instance,
            limits=limits,
            cidrs=cidrs,
            plan_spec=plan_spec,
            pool=pool,
            first_read=first_read,
            settle_reservations=settle_reservations,
        )

    async def _read_state(self, m: _Maintenance, outcome: Outcome) -> planner.NodeState:
        """The node as the next decision sees it. The cloud is read at the start (and again after a
        refusal); in between, each step's answer keeps the local view current, so a step costs one
        mutating call, not three."""
        if m.interfaces is None:
            interfaces = m.first_read
            if interfaces is None:
                interfaces = await self._cloud(outcome, self.provider.list_interfaces, m.instance.id)
                self.view.put_interfaces(m.instance.id, interfaces)
            m.first_read = None
            interfaces = await self._reconcile(m, interfaces, outcome)
            for interface in interfaces:
                self.view.put_interface(m.instance.id, interface)
            m.interfaces = interfaces
            m.pool = None  # read again if the cloud is read again
            m.settle_reservations = False
            m.allocated_ipv4 = m.free_ipv6 = None
        if m.subnets is None:
            m.subnets = await self._subnets(m.instance, outcome, fresh=bool(m.full_subnets))
        stats = m.node.stats
        return planner.NodeState(
            spec=m.plan_spec,
            limits=m.limits,
            interfaces=tuple(m.interfaces),
            subnets=tuple(s for s in m.subnets if s.id not in m.full_subnets),
            ipv4=stats.ipv4,
            needed_ipv4=stats.needed_ipv4,
            excess_ipv4=stats.excess_ipv4,
            waiting_ipv4=stats.waiting_ipv4,
            ipv6_enabled=m.node.config.ipv6_enabled,
            ipv6=stats.ipv6,
            needed_ipv6=stats.needed_ipv6,
            excess_ipv6=stats.excess_ipv6,
            waiting_ipv6=stats.waiting_ipv6,
            allocated_ipv4=m.allocated_ipv4,
            free_ipv6=m.free_ipv6,
            tagged_security_groups=m.tagged_security_groups,
            progress=m.progress,
            no_prefix_room=self._subnets_without_prefix_room(),
        )

    async def _apply(self, m: _Maintenance, step: planner.Step, outcome: Outcome) -> None:
        """Carries out one step, its answer kept in the maintenance. A refusal the cloud explains
        (a full subnet, a limit, an answer lost once) is kept too: the next decision goes round it."""
        name = m.node.name
        try:
            match step:
                case planner.ReadPool():
                    pool = await self.allocator.dump(name)
                    m.allocated_ipv4, m.free_ipv6 = pool.allocated_ipv4, pool.free_ipv6
                case planner.ReadSecurityGroups():
                    m.tagged_security_groups = await self._tagged_security_groups(m.node.config, m.instance, outcome)
                case planner.AssignIPv6():
                    await self._assign_ipv6(m, step, outcome)
                case planner.AllocationAction():
                    await self._allocate(m, step, outcome)
                case planner.ReleaseAction():
                    await self._give_back(m, step, outcome)
        except SubnetFull as exc:
            if not isinstance(step, planner.AllocationAction):
                raise
            if isinstance(exc, NoPrefixRoom) and step.prefixes:
                # Not for good: prefixes are asked of the subnet again once the back-off is over.
                log.info(
                    "node %s: subnet %s has no free /28 (%s): another subnet, else secondaries, for %.0f s",
                    name,
                    step.subnet_id,
                    exc.code,
                    self.prefix_backoff_s,
                )
                self._no_prefix_room_until[step.subnet_id] = self._clock() + self.prefix_backoff_s
                self.metrics.prefix_fallbacks.labels(step.subnet_id).inc()
            else:
                log.info("node %s: subnet %s is full (%s); trying the next one", name, step.subnet_id, exc)
                m.full_subnets.add(step.subnet_id)
                m.subnets = None
            m.node = await self.allocator.get_node(name)
        except LimitExceeded as exc:
            if not isinstance(step, planner.AllocationAction | planner.ReleaseAction):
                raise
            log.info("node %s: the cloud refused (%s); reading the truth again", name, exc)
            self._read_again(m)
            m.node = await self.allocator.get_node(name)
        except Transient as exc:
            # An assign or a create that failed this way may still have been carried out: read the
            # truth again (reconciling adds what is there) before deciding, once per maintenance.
            if m.ambiguous_seen or not isinstance(step, planner.AllocationAction | planner.AssignIPv6):
                raise
            m.ambiguous_seen = True
            log.info("node %s: %s answered %s; reading the truth again", name, exc.operation, exc.code)
            self._read_again(m)
            m.node = await self.allocator.get_node(name)

    def _subnets_without_prefix_room(self) -> frozenset[str]:
        """The subnets that had no free /28 within the back-off (those past it are tried again)."""
        now = self._clock()
        for subnet_id in [s for s, until in self._no_prefix_room_until.items() if until <= now]:
            del self._no_prefix_room_until[subnet_id]
        return frozenset(self._no_prefix_room_until)

    def _read_again(self, m: _Maintenance) -> None:
        """The next decision reads the instance's interfaces and the subnets again."""
        self.view.forget(m.instance.id)
        m.interfaces = m.subnets = None

    @staticmethod
    def _interface(m: _Maintenance, interface_id: str) -> NetworkInterface | None:
        """The interface as last read, if the maintenance holds it."""
        return next((i for i in m.interfaces or () if i.id == interface_id), None)

    def _replace_interface(self, m: _Maintenance, updated: NetworkInterface) -> None:
        """A step's answer: the interface as the cloud holds it now, in the maintenance and the view."""
        m.interfaces = _replacing(m.interfaces or [], updated)
        self.view.put_interface(m.instance.id, updated)

    def _excess_due(self, name: str, node: PoolNode) -> bool:
        """Whether the node's excess has lasted the release delay (the clock starts when it is first
        seen, and stops when there is none)."""
        if node.stats.excess_ipv4 <= 0 and node.stats.excess_ipv6 <= 0:
            self._excess_since.pop(name, None)
            return True
        since = self._excess_since.setdefault(name, time.monotonic())
        return time.monotonic() - since >= self.excess_release_delay_s

    async def _tagged_security_groups(self, spec: NodeConfig, instance: Instance, outcome: Outcome) -> tuple[str, ...]:
        """The groups of the node's VPC carrying every one of the spec's security group tags (none
        found: the policy falls back)."""
        vpc_id = spec.vpc_id or instance.vpc_id
        # The view's groups when they match; none matching may mean groups tagged since: read again.
        viewed = self.view.security_groups(vpc_id) or []
        matching = planner.security_groups_by_tags(viewed, vpc_id, spec.security_group_tags)
        cached = self._security_groups.get(vpc_id)
        if not matching and (cached is None or time.monotonic() - cached[0] > SECURITY_GROUPS_TTL_S):
            groups = await self._cloud(outcome, self.provider.list_security_groups, vpc_id)
            cached = self._security_groups[vpc_id] = (time.monotonic(), groups)
        if not matching and cached is not None:
            matching = planner.security_groups_by_tags(cached[1], vpc_id, spec.security_group_tags)
        if not matching:
            log.warning(
                "node %s: no security group of %s carries the tags %s; the new interface gets those of the primary",
                spec.name,
                vpc_id,
                dict(spec.security_group_tags),
            )
        return matching

    def _viewed_interfaces(
        self, node: PoolNode, instance_id: str, pool: PoolAddresses
    ) -> list[NetworkInterface] | None:
        """The node's interfaces from the view, when it is fresh and holds exactly the pool's
        addresses. Any difference (another replica changed the node, someone behind our back) is
        settled from the instance read alone, never from the view: nothing leaves or enters the
        pool on the view's word."""
        viewed = self.view.interfaces(instance_id)
        if viewed is None:
            return None
        first = node.config.first_interface_index
        in_view = [ip for i in viewed if i.device_index >= first for ip in (*i.pool_ipv4, *i.ipv6)]
        known = pool.listed_by_cloud(node.reserved)
        if len(in_view) != len(set(in_view)) or set(in_view) != known:
            return None
        ipv6_prefixes = [p for i in viewed if i.device_index >= first for p in i.ipv6_prefixes]
        if ipv6_prefixes != ([pool.ipv6_prefix] if pool.ipv6_prefix else []):
            return None
        return viewed

    async def _subnets(self, instance: Instance, outcome: Outcome, *, fresh: bool = False) -> list[Subnet]:
        """The zone's subnets from the view; read from the cloud when the view has none, or `fresh`
        (the cloud said one is full: the free counts are stale)."""
        viewed = None if fresh else self.view.subnets(instance.vpc_id, instance.availability_zone)
        if viewed is not None:
            return viewed
        subnets = await self._cloud(outcome, self.provider.list_subnets, instance.vpc_id, instance.availability_zone)
        self.view.put_subnets(instance.vpc_id, instance.availability_zone, subnets)
        for subnet in subnets:
            self.metrics.available_ips_per_subnet.labels(subnet.id, subnet.availability_zone).set(subnet.free_addresses)
        return subnets

    async def _reconcile(
        self, m: _Maintenance, interfaces: list[NetworkInterface], outcome: Outcome
    ) -> list[NetworkInterface]:
        """Makes the allocator's pool match what the cloud holds, in four phases: adopt what the
        cloud holds and the pool does not, drop what the pool holds and the cloud does not, settle
        stale reservations (on a resync), then give the allocator the interface table. Returns the
        interfaces as they are now; `m.node` is the node afterwards."""
        node, first = m.node, m.node.config.first_interface_index
        # What the pool holds, not the allocator's interface table: the table lists every address an
        # interface held when it was last reported, also those a crashed worker never added.
        pool = m.pool if m.pool is not None else await self.allocator.dump(node.name)
        # The /80's addresses are the pool's alone: the cloud lists the prefix, never them.
        known = pool.listed_by_cloud(node.reserved)
        current, added = await self._adopt(m, interfaces, known, pool.prefixes, outcome)
        in_cloud = {ip for i in current if i.device_index >= first for ip in (*i.pool_ipv4, *i.ipv6)}
        prefixes_in_cloud = {p for i in current if i.device_index >= first for p in i.ipv4_prefixes}
        gone_prefixes = sorted(pool.prefixes - prefixes_in_cloud)
        in_gone_prefixes = set(prefixes_addresses(gone_prefixes))
        gone_singles = sorted(known - in_cloud - node.reserved - in_gone_prefixes)
        ipv6_prefixes = [(p, i) for i in current if i.device_index >= first for p in i.ipv6_prefixes]
        gone_ipv6_prefix = pool.ipv6_prefix if pool.ipv6_prefix not in {p for p, _ in ipv6_prefixes} else ""
        gone = await self._drop_gone(node.name, gone_singles, gone_prefixes, gone_ipv6_prefix)
        # A /80 the pool lacks joins it once a gone one has left (one per pool).
        if ipv6_prefixes and (not pool.ipv6_prefix or gone_ipv6_prefix):
            prefix, interface = ipv6_prefixes[0]
            await self.allocator.add_addresses(node.name, interface, [], vpc_cidrs=m.cidrs, ipv6_prefix=prefix)
            log.info(
                "node %s: IPv6 prefix %s on %s found in the cloud, added to the pool", node.name, prefix, interface.id
            )
            added = True
        settled = await self._settle_reservations(node, in_cloud) if m.settle_reservations else False
        table_changed = await self._report_table(m, current)
        if table_changed or added or gone or settled:
            m.node = await self.allocator.get_node(node.name)
        return current

    async def _adopt(
        self,
        m: _Maintenance,
        interfaces: list[NetworkInterface],
        known: set[str] | frozenset[str],
        pool_prefixes: frozenset[str],
        outcome: Outcome,
    ) -> tuple[list[NetworkInterface], bool]:
        """Hands the allocator what the cloud holds and the pool does not know (what a crashed
        worker assigned and never added); a duplicate or a conflict is given back first. Returns
        the interfaces as they are now, and whether any was added."""
        name, first = m.node.name, m.node.config.first_interface_index
        reported = {i.id for i in m.node.interfaces}
        current: list[NetworkInterface] = []
        seen: set[str] = set()  # addresses of the interfaces before this one
        added = False
        for interface in interfaces:
            if interface.device_index < first:
                current.append(interface)
                continue  # interfaces below first_interface_index are not the pool's
            also_earlier = sorted({ip for ip in (*interface.ipv4, *interface.ipv6) if ip in seen})
            if also_earlier and self.check_conflicts:
                # The cloud gave this interface an address an earlier one of the node holds (a worker
                # died before its own check): the earlier copy stays, this one is given back.
                log.warning(
                    "node %s: %s also on an earlier interface: given back from %s",
                    name,
                    ", ".join(also_earlier),
                    interface.id,
                )
                changed = await self._cloud(outcome, self.provider.unassign_addresses, interface.id, also_earlier)
                interface = changed.interface
            missing = [ip for ip in (*interface.ipv4, *interface.ipv6) if ip not in known]
            if missing and self.check_conflicts:  # e.g. left by a worker that died before its own check
                interface, missing = await self._give_back_conflicts(name, interface, missing, outcome)
            # A prefix the pool lacks joins it whole (the subnet delegated it: nothing to check).
            new_prefixes = [p for p in interface.ipv4_prefixes if p not in pool_prefixes]
            current.append(interface)
            seen.update((*interface.ipv4, *interface.ipv6))
            if missing or new_prefixes or interface.id not in reported:
                added = True
                await self.allocator.add_addresses(
                    name, interface, missing, vpc_cidrs=m.cidrs, limits=m.limits, prefixes=new_prefixes
                )
                if new_prefixes:
                    log.info(
                        "node %s: prefix(es) %s on %s found in the cloud, added to the pool",
                        name,
                        ", ".join(new_prefixes),
                        interface.id,
                    )
                if missing:
                    log.info(
                        "node %s: %d address(es) on %s found in the cloud, added to the pool",
                        name,
                        len(missing),
                        interface.id,
                    )
        return current, added

    async def _drop_gone(
        self, name: str, gone: list[str], gone_prefixes: list[str], gone_ipv6_prefix: str = ""
    ) -> bool:
        """Addresses and prefixes the pool holds and the cloud no longer does leave the pool
        (allocated addresses, a prefix's too, are marked lost). True when there were any."""
        if not gone and not gone_prefixes and not gone_ipv6_prefix:
            return False
        newly_lost = await self.allocator.remove_addresses(
            name, gone, prefixes=gone_prefixes, ipv6_prefix=gone_ipv6_prefix
        )
        if newly_lost:
            # Their owners keep them (the node's status counts them), but none is handed out again.
            self.metrics.addresses_lost.inc(len(newly_lost))
            log.warning("node %s: %s allocated but gone from the cloud: marked lost", name, ", ".join(newly_lost))
        return True

    async def _report_table(self, m: _Maintenance, interfaces: list[NetworkInterface]) -> bool:
        """Gives the allocator the interface table and the instance's limits when they differ from
        what it holds; True when they did."""
        node = m.node
        table = _allocator_interfaces(interfaces, node.config.first_interface_index)
        limits = (m.limits.max_interfaces, m.limits.ipv4_per_interface)
        reported = (node.limits.max_interfaces, node.limits.ipv4_per_interface)
        if _comparable(table) == _comparable(node.interfaces) and reported == limits:
            return False
        await self.allocator.set_interfaces(
            node.name, table, vpc_cidrs=m.cidrs, limits=m.limits, deficit_reason=node.stats.deficit_reason
        )
        return True

    async def _give_back_conflicts(
        self, name: str, interface: NetworkInterface, ips: list[str], outcome: Outcome
    ) -> tuple[NetworkInterface, list[str]]:
        """Unassigns what the cloud handed out twice or reserved; returns the interface and the rest.
        What the view knows another interface holds is checked always (it costs no call); the
        cloud is read too when conflicts are checked."""
        instance = self.view.instance(self._node_instances.get(name, ""))
        conflicts = self.view.holders(instance.vpc_id, ips, but=interface.id) if instance is not None else set()
        if self.check_conflicts:
            conflicts |= await self._cloud(outcome, self.provider.conflicting_addresses, interface, ips)
        if not conflicts:
            return interface, ips
        log.warning(
            "node %s: the cloud gave %d address(es) already in use or reserved (%s): given back",
            name,
            len(conflicts),
            ", ".join(sorted(conflicts)),
        )
        given_back = await self._cloud(
            outcome, self.provider.unassign_addresses, interface.id, sorted(conflicts), known=interface
        )
        self.metrics.conflict_give_backs.inc()
        self.metrics.conflicting_addresses.inc(len(conflicts))
        return given_back.interface, [ip for ip in ips if ip not in conflicts]

    async def _settle_reservations(self, node: PoolNode, in_cloud: set[str]) -> bool:
        """A reservation left by a crashed worker: what the cloud no longer holds leaves the pool,
        the rest returns to it. True when any was settled."""
        settled = False
        for reservation in node.reservations:
            if reservation.age_ms < self.stale_reservation_ms:
                continue
            settled = True
            gone = await self._settle_reservation(node.name, reservation.id, reservation.ips, in_cloud)
            log.info("node %s: settled stale reservation %s (%d unassigned)", node.name, reservation.id, len(gone))
        return settled

    async def _settle_reservation(
        self, name: str, reservation_id: str, reserved: Iterable[str], in_cloud: set[str]
    ) -> list[str]:
        """Ends a reservation by what the cloud holds: the addresses gone leave the pool, only those
        still attached return to it. Returns the addresses gone."""
        gone = [ip for ip in reserved if ip not in in_cloud]
        if gone:
            await self.allocator.complete_release(name, reservation_id, gone)
        else:  # CompleteRelease without addresses would take the whole reservation as unassigned
            await self.allocator.abort_release(name, reservation_id)
        return gone

    async def _allocate(self, m: _Maintenance, action: planner.AllocationAction, outcome: Outcome) -> None:
        """Assigns IPv4 addresses on an interface or creates one, and hands them to the allocator;
        the subnet's free count is spent by what it gave."""
        name = m.node.name
        kind = "create" if action.creates_interface else "allocate"
        started = time.perf_counter()
        status = "error"
        try:
            if action.creates_interface:
                interface = await self._cloud(
                    outcome,
                    self.provider.create_interface,
                    instance_id=m.instance.id,
                    node=name,
                    subnet_id=action.subnet_id,
                    security_group_ids=action.security_group_ids,
                    device_index=action.device_index,
                    ipv4_count=action.count,
                    ipv4_prefix_count=action.prefixes,
                )
                added, prefixes = list(interface.ipv4), list(interface.ipv4_prefixes)
                outcome.interfaces_created += 1
            elif action.prefixes:
                known = self._interface(m, action.interface_id)
                change = await self._cloud(
                    outcome, self.provider.assign_prefixes, action.interface_id, action.prefixes, known=known
                )
                interface, added, prefixes = change.interface, [], list(change.prefixes)
            else:
                known = self._interface(m, action.interface_id)
                change = await self._cloud(
                    outcome, self.provider.assign_addresses, action.interface_id, action.count, known=known
                )
                interface, added, prefixes = change.interface, list(change.addresses), []
            if added:
                interface, added = await self._give_back_conflicts(name, interface, added, outcome)
            m.node = await self.allocator.add_addresses(name, interface, added, vpc_cidrs=m.cidrs, prefixes=prefixes)
            status = "success"
            count = len(added) + ADDRESSES_PER_PREFIX * len(prefixes)
            outcome.assigned += count
            outcome.actions.append(f"{kind} {count} on {interface.id}")
            self.metrics.allocation_ops.labels(action.subnet_id, status).inc(count)
        except ProviderError:
            self.metrics.allocation_ops.labels(action.subnet_id, status).inc()
            raise
        finally:
            if action.creates_interface:
                self.metrics.interface_creation_ops.labels(action.subnet_id, status).inc()
            self.metrics.action_duration.labels(kind, status, action.subnet_id).observe(time.perf_counter() - started)
        # What the subnet gave: the addresses, and a new interface's primary address if it has one (a
        # cluster pool's virtual interface has none).
        spent = count + (1 if action.creates_interface and interface.primary_ip else 0)
        assert m.subnets is not None  # read before the decision
        m.subnets = [
            replace(s, free_addresses=max(s.free_addresses - spent, 0)) if s.id == action.subnet_id else s
            for s in m.subnets
        ]
        self.view.spend(action.subnet_id, spent)
        self._replace_interface(m, interface)
        m.progress = planner.advance(m.progress, action, moved=True)

    async def _give_back(self, m: _Maintenance, action: planner.ReleaseAction, outcome: Outcome) -> None:
        """Gives free addresses of either family back to the cloud (`_release`); the pool's free
        addresses are read again before the next release."""
        released = await self._release(m.node, action, outcome, self._interface(m, action.interface_id))
        m.allocated_ipv4 = m.free_ipv6 = None
        m.progress = planner.advance(m.progress, action, moved=released is not None)
        if released is None:
            return
        self._replace_interface(m, released)
        m.released_some = True
        m.node = await self.allocator.get_node(m.node.name)

    async def _release(
        self,
        node: PoolNode,
        action: planner.ReleaseAction,
        outcome: Outcome,
        known: NetworkInterface | None = None,
    ) -> NetworkInterface | None:
        """The handshake: reserve (never handed out again) -> unassign -> complete. Returns the
        interface as the cloud holds it now, None when nothing could be released.

        A failed unassign may still have been carried out (EC2 did it but answered 500, the answer
        timed out, the read-back was throttled): the interface is read again, what is gone leaves
        the pool and only what is still attached returns to it. When the truth cannot be read, or
        the call was cancelled while its thread may still be running, the reservation stays: its
        addresses are never handed out, and the resync settles it against the cloud once stale."""
        name = node.name
        reply = await self.allocator.reserve_for_release(
            name, action.interface_id, action.count, action.family, prefix=action.prefix
        )
        if not reply.ips:
            return None
        started = time.perf_counter()
        try:
            if action.prefix:
                change = await self._cloud(
                    outcome, self.provider.unassign_prefixes, action.interface_id, [action.prefix], known=known
                )
            else:
                change = await self._cloud(
                    outcome, self.provider.unassign_addresses, action.interface_id, list(reply.ips), known=known
                )
        except ProviderError as exc:
            self.metrics.release_ops.labels(action.subnet_id, "error").inc()
            await self._settle_failed_release(node, action.interface_id, reply, exc, outcome)
            raise
        except BaseException:
            self.metrics.release_ops.labels(action.subnet_id, "error").inc()
            log.warning("node %s: release %s interrupted: left for the resync to settle", name, reply.id)
            raise
        released = await self.allocator.complete_release(name, reply.id, change.addresses)
        outcome.released += len(released)
        outcome.actions.append(f"release {len(released)} from {action.interface_id}")
        self.metrics.release_ops.labels(action.subnet_id, "success").inc(len(released))
        self.metrics.action_duration.labels("release", "success", action.subnet_id).observe(
            time.perf_counter() - started
        )
        return change.interface if released else None

    async def _settle_failed_release(
        self,
        node: PoolNode,
        interface_id: str,
        reservation: Reservation,
        error: ProviderError,
        outcome: Outcome,
    ) -> None:
        """After an unassign that failed: settles the reservation by what the interface holds now."""
        name = node.name
        try:
            instance_id = self._node_instances.get(name, node.config.instance_id)
            interfaces = await self._cloud(outcome, self.provider.list_interfaces, instance_id)
        except ProviderError as exc:
            log.warning(
                "node %s: unassign failed (%s) and the interface could not be read (%s): reservation %s left "
                "for the resync to settle",
                name,
                error,
                exc,
                reservation.id,
            )
            return
        # An interface no longer attached holds none of the node's addresses.
        held = {ip for i in interfaces if i.id == interface_id for ip in (i.primary_ip, *i.pool_ipv4, *i.ipv6)}
        gone = await self._settle_reservation(name, reservation.id, reservation.ips, held)
        log.warning(
            "node %s: unassign failed (%s); read again: %d of %d address(es) gone, the rest back in the pool",
            name,
            error,
            len(gone),
            len(reservation.ips),
        )

    async def _assign_ipv6(self, m: _Maintenance, step: planner.AssignIPv6, outcome: Outcome) -> None:
        """Assigns IPv6 addresses, or the node's /80, as the policy chose and hands them to the allocator."""
        if step.prefix:
            known = self._interface(m, step.interface_id)
            change = await self._cloud(outcome, self.provider.assign_ipv6_prefix, step.interface_id, known=known)
            moved = bool(change.prefixes)
            node = m.node
            if moved:  # one per pool: the allocator takes the first (a second could only be the cloud's doing)
                node = await self.allocator.add_addresses(
                    m.node.name, change.interface, [], vpc_cidrs=m.cidrs, ipv6_prefix=change.prefixes[0]
                )
                outcome.actions.append(f"assign IPv6 prefix {change.prefixes[0]} on {step.interface_id}")
        else:
            change = await self._cloud(
                outcome, self.provider.assign_addresses, step.interface_id, step.count, Family.IPV6
            )
            moved = bool(change.addresses)
            node = await self.allocator.add_addresses(m.node.name, change.interface, change.addresses)
            outcome.assigned += len(change.addresses)
        m.progress = planner.advance(m.progress, step, moved=moved)
        if moved:
            self._replace_interface(m, change.interface)
            m.node = node

    async def _report(self, node: PoolNode, interfaces: list[NetworkInterface] | None, outcome: Outcome) -> None:
        """Tells the allocator the interfaces as they are now (when they changed), why a deficit
        stays, if it does (so callers fail fast with that reason), and the node's last error: the
        blocking reason's, or none after a maintenance that met no error."""
        blocking = outcome.reason if outcome.reason in BLOCKING_REASONS else ""
        error = f"{blocking}: {outcome.detail}" if blocking and outcome.detail else blocking or outcome.notice
        if error != node.last_error:
            await self.report_error(node.name, error)
        if interfaces is None and blocking == node.stats.deficit_reason:
            return
        first = node.config.first_interface_index
        table = _allocator_interfaces(interfaces, first) if interfaces is not None else list(node.interfaces)
        try:
            await self.allocator.set_interfaces(
                node.name, table, vpc_cidrs=node.vpc_cidrs, limits=node.limits, deficit_reason=blocking
            )
        except AllocatorError as exc:
            log.warning("node %s: could not report its interfaces: %s", node.name, exc)

    async def report_error(self, name: str, error: str) -> None:
        """Keeps `error` ("" clears it) as the node's last error, on one line; a failure is logged."""
        try:
            await self.allocator.set_node_error(name, " ".join(error.split())[:1000])
        except AllocatorError as exc:
            log.warning("node %s: could not report its last error: %s", name, exc)


def _allocator_interfaces(interfaces: Iterable[NetworkInterface], first_interface_index: int) -> list[NetworkInterface]:
    """The allocator's interface table: the interfaces that hold the pool's addresses."""
    return [i for i in interfaces if i.device_index >= first_interface_index]


def _comparable(interfaces: Iterable[NetworkInterface]) -> dict[str, tuple[Any, ...]]:
    """What the allocator's interface table says, in a form to compare (the subnets too: a table
    reported without its IPv6 subnet is reported again)."""
    return {
        i.id: (
            i.device_index,
            frozenset((*i.ipv4, *i.ipv6)),
            frozenset(i.ipv4_prefixes),
            i.subnet_cidr,
            i.subnet_ipv6_cidr,
            i.gateway_ipv6,
        )
        for i in interfaces
    }


def _replacing(interfaces: list[NetworkInterface], updated: NetworkInterface) -> list[NetworkInterface]:
    """The interface list with `updated` replacing its old self (or added, when new)."""
    return sorted([i for i in interfaces if i.id != updated.id] + [updated], key=lambda i: i.device_index)
