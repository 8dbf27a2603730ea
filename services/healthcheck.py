"""`python -m services.healthcheck HOST:PORT`: exits 0 when the gRPC health service says SERVING;
`--http URL`: exits 0 when the URL answers 2xx (the local EC2, metrics endpoints).

Used by docker-compose health checks and by the native cluster alike.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", nargs="?", help="host:port of a gRPC server with grpc.health.v1")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--http", default="", help="check this URL instead")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--tls-ca", default="", help="CA of the server's certificate: check over TLS")
    parser.add_argument("--tls-cert", default="", help="client certificate, for a mutual-TLS server")
    parser.add_argument("--tls-key", default="", help="client key, for a mutual-TLS server")
    args = parser.parse_args(argv)
    if args.http:
        try:
            with urllib.request.urlopen(args.http, timeout=args.timeout):
                return 0
        except OSError as exc:
            print(f"{args.http}: {exc}", file=sys.stderr)
            return 1
    if not args.address:
        parser.error("an address or --http URL is required")
    try:
        if args.tls_ca:

            def read(path: str) -> bytes | None:
                return Path(path).read_bytes() if path else None

            credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
            channel = grpc.secure_channel(args.address, credentials)
        else:
            channel = grpc.insecure_channel(args.address)
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"{args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
