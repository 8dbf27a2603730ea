"""IPv4 /28 prefixes in the pool, through the allocator's gRPC API: they enter whole, AllocateNext
empties the fullest first, GetNode and Dump show their use, and a wholly free prefix is reserved
for release in one step (on one Redis and on a Redis Cluster)."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator, Sequence

import grpc
import pytest

from ipam.v1 import allocator_pb2 as pb
from ipam.v1 import nodes_pb2 as npb
from tests.support.allocator_process import AllocatorProcess
from tests.support.api import Api, expect_error, reason_of
from tests.support.polling import poll
from tests.support.redis_server import RedisServer

SUBNET = "10.20.0.0/16"
A, B = "10.20.1.0/28", "10.20.1.16/28"
SINGLES = ["10.20.2.10", "10.20.2.11"]


def _interface(interface_id: str = "eni-p0", subnet: str = SUBNET) -> npb.Interface:
    return npb.Interface(
        id=interface_id, mac="02:42:ac:11:00:09", device_index=1, subnet_cidr=subnet, gateway_ip="10.20.0.1"
    )


def _add(
    api: Api, node: str, prefixes: list[str], ips: Sequence[str] = (), **fields: object
) -> npb.AddAddressesResponse:
    request = npb.AddAddressesRequest(
        node=node, interface=_interface(), ips=list(ips), ipv4_prefixes=prefixes, vpc_cidrs=[SUBNET], **fields
    )
    return api.nodes.AddAddresses(request, timeout=5)


def _allocate(api: Api, node: str, owner: str) -> str:
    reply = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner), timeout=5)
    return reply.ipv4.ip


def _in(ip: str, prefix: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(prefix)


def _uses(api: Api, node: str) -> dict[str, tuple[int, int, int, int, int]]:
    node_msg = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    return {p.prefix: (p.free, p.cooling, p.allocated, p.excluded, p.reserved) for p in node_msg.prefixes}


def _reserve(api: Api, node: str, prefix: str) -> npb.ReserveForReleaseResponse:
    return api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=node, prefix=prefix), timeout=5)


def test_a_prefix_enters_whole_and_the_fullest_prefix_is_emptied_first(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    reply = _add(api, node, [A, B], SINGLES, max_interfaces=3, ipv4_per_interface=10)
    assert list(reply.added_prefixes) == [A, B] and list(reply.added_ips) == SINGLES
    assert reply.node.stats.available_ips == 34 and reply.node.stats.ipv4_prefixes == 2
    assert list(reply.node.interfaces[0].ipv4_prefixes) == [A, B]
    assert _add(api, node, [A]).added_prefixes == []  # known: skipped
    # An address of a prefix answers with its interface, as a single address does.
    result = api.alloc.AllocateNext(pb.AllocateNextRequest(node=node, owner="probe"), timeout=5).ipv4
    assert (result.interface_id, result.gateway_ip, result.subnet_cidr) == ("eni-p0", "10.20.0.1", SUBNET)
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=result.ip), timeout=5)

    taken = [_allocate(api, node, f"p{i}") for i in range(20)]
    assert all(_in(ip, A) for ip in taken[:16]) and all(_in(ip, B) for ip in taken[16:])
    assert sorted(taken[:16], key=ipaddress.ip_address)[0] == "10.20.1.0"  # .0 and .15 of a /28 are hosts
    # Two addresses of A come back: A now has the fewest free, so it is filled again before B.
    for ip in taken[:2]:
        api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)
    again = [_allocate(api, node, f"q{i}") for i in range(2)]
    assert sorted(again) == sorted(taken[:2])
    # Single addresses go only once every prefix is empty: they are the first to give back.
    rest = [_allocate(api, node, f"r{i}") for i in range(12)]
    assert all(_in(ip, B) for ip in rest)
    assert sorted(_allocate(api, node, f"s{i}") for i in range(2)) == SINGLES

    assert _uses(api, node) == {A: (0, 0, 16, 0, 0), B: (0, 0, 16, 0, 0)}
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
    assert len(dump.ipv4) == 34 and list(dump.free_ipv4) == []
    assert [(p.prefix, p.interface_id, p.allocated) for p in dump.prefixes] == [(A, "eni-p0", 16), (B, "eni-p0", 16)]


def test_statistics_count_a_prefix_in_use_whole_and_the_capacity_in_prefixes(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True, release_excess=True, first_interface_index=1)
    stats = _add(api, node, [A, B], max_interfaces=3, ipv4_per_interface=10).node.stats
    assert (stats.available_ips, stats.excess_ips, stats.max_allocatable_ipv4) == (32, 32, (3 - 1) * (10 - 1) * 16)
    _allocate(api, node, "pod")  # from A: A is in use, its 15 free addresses cannot be given back
    stats = api.stats(node)
    assert (stats.used_ips, stats.excess_ips) == (1, 16)
    assert _uses(api, node) == {A: (15, 0, 1, 0, 0), B: (16, 0, 0, 0, 0)}

    single = api.create_node(first_interface_index=1)
    api.nodes.AddAddresses(
        npb.AddAddressesRequest(
            node=single, interface=_interface(), ips=SINGLES, max_interfaces=3, ipv4_per_interface=10
        ),
        timeout=5,
    )
    assert api.stats(single).max_allocatable_ipv4 == (3 - 1) * (10 - 1)


@pytest.mark.parametrize(
    ("prefixes", "ips", "subnet"),
    [
        (["10.20.1.5/28"], [], SUBNET),  # not on a /28 boundary
        (["10.20.1.0/27"], [], SUBNET),
        (["10.21.0.0/28"], [], SUBNET),  # outside the interface's subnet
        (["2001:db8::/80"], [], SUBNET),
        (["nonsense"], [], SUBNET),
        ([A], [], ""),  # no subnet to check it against
        ([A], ["10.20.1.3"], SUBNET),  # an address sent alone and inside the prefix
    ],
    ids=["off-boundary", "a-27", "outside-subnet", "ipv6", "nonsense", "no-subnet", "address-inside"],
)
def test_a_malformed_prefix_is_refused_and_changes_nothing(
    api: Api, prefixes: list[str], ips: list[str], subnet: str
) -> None:
    node = api.create_node()
    request = npb.AddAddressesRequest(
        node=node, interface=_interface(subnet=subnet), ips=ips, ipv4_prefixes=prefixes, vpc_cidrs=[SUBNET]
    )
    expect_error(api.nodes.AddAddresses, request, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PREFIX")
    node_msg = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert (node_msg.stats.available_ips, list(node_msg.prefixes), list(node_msg.pools)) == (0, [], ["default"])


def test_a_prefix_overlapping_the_pool_is_refused_and_changes_nothing(api: Api) -> None:
    node = api.create_node()
    _add(api, node, [], ["10.20.1.3"])
    _add(api, node, [B])
    for interface_id, prefixes, ips in (
        ("eni-p0", [A], []),  # holds a single address of the pool
        ("eni-p0", [], ["10.20.1.20"]),  # an address inside a prefix of the pool
        ("eni-p1", [B], []),  # another interface's prefix
    ):
        request = npb.AddAddressesRequest(
            node=node, interface=_interface(interface_id), ips=ips, ipv4_prefixes=prefixes, vpc_cidrs=[SUBNET]
        )
        expect_error(api.nodes.AddAddresses, request, grpc.StatusCode.FAILED_PRECONDITION, "PREFIX_OVERLAPS")
    assert api.stats(node).available_ips == 17 and set(_uses(api, node)) == {B}


def test_a_prefix_is_reserved_whole_only_when_every_address_is_free(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    _add(api, node, [A], SINGLES)
    held = _allocate(api, node, "pod")
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=node, prefix=A),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PREFIX_IN_USE",
    )
    api.alloc.ExcludeIP(pb.ExcludeIPRequest(node=node, ip="10.20.1.7", owner="ops"), timeout=5)
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=held), timeout=5)
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=node, prefix=A),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PREFIX_IN_USE",
    )
    assert api.stats(node).reserved_ips == 0 and _uses(api, node)[A] == (15, 0, 0, 1, 0)
    # Reserving by count takes single addresses only: a prefix's address leaves only with its prefix.
    by_count = api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=node, count=10), timeout=5)
    assert sorted(by_count.ips) == SINGLES
    api.nodes.AbortRelease(npb.AbortReleaseRequest(node=node, reservation_id=by_count.reservation_id), timeout=5)
    for bad in ("10.20.1.3/28", "10.20.1.0/24"):
        expect_error(
            api.nodes.ReserveForRelease,
            npb.ReserveForReleaseRequest(node=node, prefix=bad),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PREFIX",
        )
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=node, prefix=B),
        grpc.StatusCode.NOT_FOUND,
        "PREFIX_NOT_IN_POOL",
    )


def test_a_reserved_prefix_is_never_handed_out_then_leaves_whole_or_returns(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    _add(api, node, [A, B])
    reserved = _reserve(api, node, A)
    assert sorted(reserved.ips, key=ipaddress.ip_address) == [str(a) for a in ipaddress.ip_network(A)]
    assert api.stats(node).reserved_ips == 16 and _uses(api, node)[A] == (0, 0, 0, 0, 16)
    (open_reservation,) = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).reservations
    assert (open_reservation.id, open_reservation.prefix, len(open_reservation.ips)) == (reserved.reservation_id, A, 16)
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip="10.20.1.4", owner="x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IP_RESERVED_FOR_RELEASE",
    )
    assert all(_in(_allocate(api, node, f"p{i}"), B) for i in range(16))
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, owner="late"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
    )
    # Aborted: all 16 come back.
    restored = api.nodes.AbortRelease(npb.AbortReleaseRequest(node=node, reservation_id=reserved.reservation_id))
    assert len(restored.restored_ips) == 16 and _uses(api, node)[A] == (16, 0, 0, 0, 0)
    # Completed: the prefix and its 16 addresses leave the pool.
    again = _reserve(api, node, A)
    done = api.nodes.CompleteRelease(npb.CompleteReleaseRequest(node=node, reservation_id=again.reservation_id))
    assert len(done.released_ips) == 16 and set(_uses(api, node)) == {B}
    stats = api.stats(node)
    assert (stats.available_ips, stats.reserved_ips, stats.ipv4_prefixes) == (16, 0, 1)
    expect_error(
        api.alloc.Allocate,
        pb.AllocateRequest(node=node, ip="10.20.1.4", owner="x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IP_NOT_IN_POOL",
    )
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, owner="late"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
    )


def test_allocations_racing_a_prefix_release_never_take_from_the_reserved_or_gone_prefix(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    _add(api, node, [A])
    reserved_at: list[float] = []  # when the reservation was answered
    violations: list[str] = []
    stop = threading.Event()

    def churn(worker: int) -> None:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                ip = _allocate(api, node, f"w{worker}-{n}")
            except grpc.RpcError as error:
                assert reason_of(error) == "POOL_EMPTY", error
                continue
            finally:
                n += 1
            if reserved_at and started > reserved_at[0]:
                violations.append(ip)
            api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    refused = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                reservation = _reserve(api, node, A)
            except grpc.RpcError as error:
                assert reason_of(error) == "PREFIX_IN_USE", error
                refused += 1
                continue
            reserved_at.append(time.monotonic())
            break
        assert reserved_at, "the prefix was never wholly free"
        time.sleep(0.2)  # the churn goes on against the reserved prefix
        api.nodes.CompleteRelease(npb.CompleteReleaseRequest(node=node, reservation_id=reservation.reservation_id))
        time.sleep(0.2)  # and against the prefix gone
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert violations == []
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
    assert (dict(dump.ipv4), list(dump.free_ipv4), list(dump.prefixes)) == ({}, [], [])


@pytest.fixture(scope="module")
def cooling_api(redis_server: RedisServer) -> Iterator[Api]:
    process = AllocatorProcess(redis_server.url, reuse_cooldown_seconds=60).start()
    client = Api(process.address)
    yield client
    client.close()
    process.stop()


def test_a_prefix_with_an_address_in_the_reuse_cooldown_is_not_reserved(cooling_api: Api) -> None:
    api = cooling_api
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    _add(api, node, [A, B])
    ip = _allocate(api, node, "pod")
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=ip), timeout=5)
    expect_error(
        api.nodes.ReserveForRelease,
        npb.ReserveForReleaseRequest(node=node, prefix=A),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PREFIX_COOLING_DOWN",
    )
    assert _uses(api, node)[A] == (15, 1, 0, 0, 0) and api.stats(node).reserved_ips == 0
    # The cooling address is never handed out: the next comes from A's other 15, A still the fullest.
    assert _in(_allocate(api, node, "next"), A) and _uses(api, node)[A] == (14, 1, 1, 0, 0)
    assert len(_reserve(api, node, B).ips) == 16


def test_a_dual_stack_call_short_of_ipv6_takes_nothing_from_a_prefix(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True, ipv6_enabled=True)
    _add(api, node, [A, B])
    _allocate(api, node, "first")  # A is now the fullest
    request = pb.AllocateNextRequest(node=node, family=pb.FAMILY_UNSPECIFIED, owner="both")
    expect_error(api.alloc.AllocateNext, request, grpc.StatusCode.RESOURCE_EXHAUSTED, "POOL_EMPTY")
    assert _uses(api, node) == {A: (15, 0, 1, 0, 0), B: (16, 0, 0, 0, 0)}
    assert _in(_allocate(api, node, "second"), A)  # still the fullest: its count was put back


def test_keyed_retries_and_lost_addresses_keep_a_prefix_whole(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    _add(api, node, [A, B])
    keyed = pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="pod", idempotency_key="pod/eth0")
    first = api.alloc.AllocateNext(keyed, timeout=5).ipv4.ip
    assert api.alloc.AllocateNext(keyed, timeout=5).ipv4.ip == first and _uses(api, node)[A] == (15, 0, 1, 0, 0)
    # A prefix's address leaves the pool only with its prefix, never alone.
    removed = api.nodes.RemoveAddresses(npb.RemoveAddressesRequest(node=node, ips=[first, "10.20.1.20"]), timeout=5)
    assert (list(removed.removed_ips), list(removed.still_allocated)) == ([], [])
    assert api.stats(node).available_ips == 32 and api.stats(node).lost_ips == 0
    api.alloc.ReleaseByKey(pb.ReleaseByKeyRequest(node=node, idempotency_key="pod/eth0"), timeout=5)
    assert _uses(api, node)[A] == (16, 0, 0, 0, 0)


def test_callers_waiting_for_a_refill_are_served_by_a_prefix(api: Api) -> None:
    node = api.create_node()
    replies: list[str] = []

    def caller(owner: str) -> None:
        request = pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner=owner, wait_for_refill=True)
        replies.append(api.alloc.AllocateNext(request, timeout=10).ipv4.ip)

    threads = [threading.Thread(target=caller, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    poll(lambda: api.stats(node).waiting_ipv4 == 3)
    _add(api, node, [B])
    for t in threads:
        t.join(10)
    assert len(replies) == 3 and all(_in(ip, B) for ip in replies)


SUBNET6 = "2001:db8:0:7::/64"


def _add_ipv6_prefix(api: Api, node: str, prefix: str) -> npb.AddAddressesResponse:
    subnet = str(ipaddress.ip_network(prefix).supernet(new_prefix=64))
    interface = npb.Interface(
        id="eni-p0", mac="02:42:ac:11:00:09", device_index=0, subnet_ipv6_cidr=subnet, gateway_ipv6="fe80:ec2::1"
    )
    request = npb.AddAddressesRequest(node=node, interface=interface, ipv6_prefix=prefix, vpc_cidrs=[SUBNET, subnet])
    return api.nodes.AddAddresses(request, timeout=5)


def _allocate6(api: Api, node: str, owner: str) -> pb.AllocationResult:
    request = pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV6, owner=owner)
    return api.alloc.AllocateNext(request, timeout=5).ipv6


# Their addresses written out show each way of writing zeros: a run at the end, and two runs of the
# same length (the first is the one written "::").
@pytest.mark.parametrize("prefix", ["2001:db8:0:7::/80", "2001:0:0:7:ab::/80"])
def test_an_ipv6_80_hands_out_addresses_one_by_one_and_reuses_released_ones(api: Api, prefix: str) -> None:
    node = api.create_node(pre_allocate=2, pre_allocate_set=True, ipv6_enabled=True)
    reply = _add_ipv6_prefix(api, node, prefix)
    assert list(reply.added_prefixes) == [prefix] and reply.node.ipv6_prefix == prefix
    assert (reply.node.stats.needed_ipv6, reply.node.stats.available_ipv6) == (0, 0)
    base = ipaddress.ip_network(prefix).network_address
    first = [_allocate6(api, node, f"p{i}") for i in range(3)]
    # Written as the allocator writes every address it takes in (ipaddress's text), from the first host.
    assert [r.ip for r in first] == [str(base + i) for i in (1, 2, 3)]
    subnet = str(ipaddress.ip_network(prefix).supernet(new_prefix=64))
    assert (first[0].interface_id, first[0].subnet_cidr, first[0].gateway_ip) == ("eni-p0", subnet, "fe80:ec2::1")
    # Named in the /80 beyond the cursor: the cursor passes it by later.
    api.alloc.Allocate(pb.AllocateRequest(node=node, ip=str(base + 4), owner="named"), timeout=5)
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=first[1].ip), timeout=5)
    assert _allocate6(api, node, "again").ip == first[1].ip  # a released address goes first
    assert _allocate6(api, node, "next").ip == str(base + 5)
    stats = api.stats(node)
    assert (stats.used_ipv6, stats.available_ipv6, stats.needed_ipv6, stats.excess_ipv6) == (5, 5, 0, 0)
    expect_error(
        api.nodes.AddAddresses,
        npb.AddAddressesRequest(
            node=node,
            interface=npb.Interface(id="eni-p0", subnet_ipv6_cidr=subnet),
            ipv6_prefix=str(ipaddress.ip_network(prefix).network_address + (1 << 48)) + "/80",
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "IPV6_PREFIX_HELD",
    )
    assert _add_ipv6_prefix(api, node, prefix).added_prefixes == []  # known: skipped
    dump = api.admin_alloc.Dump(pb.DumpRequest(node=node), timeout=5)
    assert dump.ipv6_prefix == prefix and len(dump.ipv6) == 5


@pytest.mark.parametrize("prefix", ["2001:db8:0:7::/64", "2001:db8:0:7::1/80", "2001:db8:0:8::/80", "10.20.1.0/28"])
def test_a_malformed_ipv6_prefix_is_refused_and_changes_nothing(api: Api, prefix: str) -> None:
    node = api.create_node(ipv6_enabled=True)
    interface = npb.Interface(id="eni-p0", subnet_ipv6_cidr=SUBNET6)
    request = npb.AddAddressesRequest(node=node, interface=interface, ipv6_prefix=prefix)
    expect_error(api.nodes.AddAddresses, request, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PREFIX")
    assert api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5).ipv6_prefix == ""


def test_a_prefix_gone_from_the_cloud_takes_its_addresses_along(api: Api) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True, ipv6_enabled=True)
    _add(api, node, [A, B])
    held = _allocate(api, node, "pod")  # from A
    _add_ipv6_prefix(api, node, "2001:db8:0:7::/80")
    held6 = [_allocate6(api, node, f"v6-{i}").ip for i in range(2)]
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=held6[1]), timeout=5)
    request = npb.RemoveAddressesRequest(node=node, ipv4_prefixes=[A], ipv6_prefix="2001:db8:0:7::/80")
    reply = api.nodes.RemoveAddresses(request, timeout=5)
    assert list(reply.removed_prefixes) == [A, "2001:db8:0:7::/80"]
    assert (sorted(reply.still_allocated), sorted(reply.newly_lost)) == (sorted([held, held6[0]]),) * 2
    assert len(reply.removed_ips) == 16  # A's 15 free, and the /80's one free again
    node_msg = api.nodes.GetNode(npb.GetNodeRequest(name=node), timeout=5)
    assert ([p.prefix for p in node_msg.prefixes], node_msg.ipv6_prefix) == ([B], "")
    assert (node_msg.stats.available_ips, node_msg.stats.lost_ips) == (16, 2)
    # Lost: released by its owner, it never returns to the pool; nothing comes from A again.
    api.alloc.Release(pb.ReleaseRequest(node=node, ip=held), timeout=5)
    assert all(_in(_allocate(api, node, f"p{i}"), B) for i in range(16))
    expect_error(
        api.alloc.AllocateNext,
        pb.AllocateNextRequest(node=node, family=pb.FAMILY_IPV4, owner="late"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
    )
    # A prefix the pool does not hold (or no longer) is no error, and changes nothing.
    again = api.nodes.RemoveAddresses(npb.RemoveAddressesRequest(node=node, ipv4_prefixes=[A]), timeout=5)
    assert list(again.removed_prefixes) == [] and api.stats(node).available_ips == 16
    # The /80 assigned again: its lost address is its owner's once more, and the cursor passes it by.
    _add_ipv6_prefix(api, node, "2001:db8:0:7::/80")
    stats = api.stats(node)
    assert (stats.lost_ips, stats.used_ipv6, stats.available_ipv6) == (0, 1, 1)
    assert _allocate6(api, node, "v6-new").ip == "2001:db8:0:7::2"


def test_a_named_pool_keeps_its_own_prefixes_and_an_expired_timer_returns_an_address_to_its_prefix(
    api: Api,
) -> None:
    node = api.create_node(pre_allocate=0, pre_allocate_set=True)
    _add(api, node, [A], pool="blue")
    _add(api, node, [B])
    timed = api.alloc.AllocateNext(
        pb.AllocateNextRequest(node=node, pool="blue", family=pb.FAMILY_IPV4, owner="job", expiration_seconds=1),
        timeout=5,
    ).ipv4
    assert _in(timed.ip, A) and timed.expiration_uuid
    assert _in(_allocate(api, node, "pod"), B)  # the default pool's own prefix
    poll(lambda: api.dump(node, pool="blue")[0] == {})
    # Back in its prefix: A is wholly free again, so it is reserved whole.
    reply = api.nodes.ReserveForRelease(npb.ReserveForReleaseRequest(node=node, pool="blue", prefix=A), timeout=5)
    assert sorted(reply.ips, key=ipaddress.ip_address) == [str(a) for a in ipaddress.ip_network(A)]
