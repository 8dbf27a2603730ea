"""Pure parts of the Python client: target parsing, channel options, error translation, node specs."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from clients.client import IpamClientError, channel_options, node_spec, parse_target


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("  allocator.ipam.svc:50051 ", "allocator.ipam.svc:50051"),
        ("allocator:50051,", "allocator:50051"),
        ("dns:///allocator:50051", "dns:///allocator:50051"),
        ("unix:/run/ipam.sock", "unix:/run/ipam.sock"),
        ("10.0.0.1:50051,10.0.0.2:50052", "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
        ("10.0.0.1:50051, 10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[::1]:50051,[fd00::2]:50051", "ipv6:[::1]:50051,[fd00::2]:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
    ],
)
def test_parse_target(address: str, target: str) -> None:
    assert parse_target(address) == target


@pytest.mark.parametrize(
    ("address", "complaint"),
    [
        ("", "no allocator address"),
        (" , ", "no allocator address"),
        ("allocator-a:50051,allocator-b:50051", "is not an IP address"),
        ("10.0.0.1,10.0.0.2:50051", "is not host:port"),
        ("10.0.0.1:50051,10.0.0.2:http", "is not host:port"),
        ("10.0.0.1:50051,[::1]:50051", "cannot mix"),
    ],
)
def test_parse_target_refuses(address: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_target(address)


def test_channel_options_balance_and_retry_unavailable() -> None:
    options = dict(channel_options(max_attempts=4, tls_server_name="allocator"))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {name["service"] for name in method["name"]} == {"ipam.v1.Allocator", "ipam.v1.NodeManager"}
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.ssl_target_name_override"] == "allocator"


def test_channel_options_without_retries() -> None:
    options = dict(channel_options(max_attempts=1))
    assert "methodConfig" not in json.loads(options["grpc.service_config"])
    assert options["grpc.enable_retries"] == 0


class _FailedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a stub raises: an RpcError that is also a Call (only the parts the client reads)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, bytes], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def _with_error_info(code: grpc.StatusCode, rpc_code: int, message: str, reason: str) -> _FailedCall:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="ipam.v1", metadata={"node": "n1"}))
    status = status_pb2.Status(code=rpc_code, message=message, details=[detail])
    return _FailedCall(code, message, (("grpc-status-details-bin", status.SerializeToString()),))


def test_error_carries_the_error_info_reason() -> None:
    message = "pool default of node n1 has no free IPv4 address"
    call = _with_error_info(grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED, message, "POOL_EMPTY")
    error = IpamClientError.from_rpc_error(call)
    assert (error.code, error.reason, error.message) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EMPTY",
        message,
    )
    assert error.metadata == {"node": "n1"}
    assert str(error) == f"RESOURCE_EXHAUSTED POOL_EMPTY: {message}"


def test_error_without_details_has_an_empty_reason() -> None:
    error = IpamClientError.from_rpc_error(_FailedCall(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "")
    assert str(error) == "DEADLINE_EXCEEDED: Deadline Exceeded"


def test_error_ignores_a_contradicting_status_detail() -> None:
    call = _with_error_info(grpc.StatusCode.UNAVAILABLE, code_pb2.NOT_FOUND, "gone", "NODE_NOT_FOUND")
    error = IpamClientError.from_rpc_error(call)
    assert (error.code, error.reason, error.message) == (grpc.StatusCode.UNAVAILABLE, "", "gone")


def test_error_line_is_one_line_and_does_not_repeat_the_code() -> None:
    error = IpamClientError(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "bad\n  input")
    assert str(error) == "INVALID_ARGUMENT: bad input"


def test_node_spec_marks_an_explicit_pre_allocate() -> None:
    assert not node_spec("n1").pre_allocate_set
    explicit_zero = node_spec("n1", pre_allocate=0, subnet_tags={"team": "net"}, subnet_ids=["subnet-1"])
    assert explicit_zero.pre_allocate_set and explicit_zero.pre_allocate == 0
    assert dict(explicit_zero.subnet_tags) == {"team": "net"}
    assert list(explicit_zero.subnet_ids) == ["subnet-1"]
