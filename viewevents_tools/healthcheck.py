"""Container health check: exit 0 when a service's grpc.health.v1 says SERVING.

    python -m viewevents_tools.healthcheck HOST:PORT [--tls-ca FILE]

Used by deploy/docker-compose.yml, where no grpc_health_probe binary is available.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viewevents_tools.healthcheck", description=__doc__)
    parser.add_argument("address")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) when the port serves TLS")
    parser.add_argument(
        "--tls-server-name",
        default="localhost",
        help="name the server certificate must carry (default localhost)",
    )
    args = parser.parse_args(argv)
    if args.tls_ca:
        with open(args.tls_ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
        channel = grpc.secure_channel(
            args.address,
            credentials,
            options=[("grpc.ssl_target_name_override", args.tls_server_name)],
        )
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
