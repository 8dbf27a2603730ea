"""TLS is one setting away: a certificate path turns it on; a client CA makes it mutual."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from clients.client import IpamClient, IpamClientError
from tests.support.allocator_process import ADMIN_TOKEN, AllocatorProcess
from tests.support.certs import make_certificates
from tests.support.redis_server import RedisServer


def test_tls_serves_trusting_clients_and_refuses_plaintext(redis_server: RedisServer, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    trusting = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    with AllocatorProcess(
        redis_server.url, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, health_credentials=trusting
    ) as process:
        with IpamClient(process.address, token=ADMIN_TOKEN, tls_ca=certs.ca, timeout=5) as client:
            client.ping()
            assert "nodes:" in client.debug_status()
        with (
            IpamClient(process.address, token=ADMIN_TOKEN, timeout=2, max_attempts=1) as plaintext,
            pytest.raises(IpamClientError) as info,
        ):
            plaintext.ping()
        assert info.value.code.name == "UNAVAILABLE"


def test_mutual_tls_needs_a_client_certificate(redis_server: RedisServer, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    with_certificate = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
    )
    with AllocatorProcess(
        redis_server.url,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca,
        health_credentials=with_certificate,
    ) as process:
        with IpamClient(
            process.address,
            token=ADMIN_TOKEN,
            tls_ca=certs.ca,
            tls_cert=certs.client_cert,
            tls_key=certs.client_key,
            timeout=5,
        ) as client:
            client.ping()
        with (
            IpamClient(process.address, token=ADMIN_TOKEN, tls_ca=certs.ca, timeout=2, max_attempts=1) as anonymous,
            pytest.raises(IpamClientError) as info,
        ):
            anonymous.ping()
        assert info.value.code.name == "UNAVAILABLE"
