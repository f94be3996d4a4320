"""The cost of a unary call in Python gRPC itself: a bare grpc.aio server whose GetMediaStats
returns an empty answer at once, measured the same way as the real one (ghz, same concurrency,
server CPU per call). It tells how much of the stats service's latency is the query and how
much is the call, which no query work can remove.

    python -m benchmarks.grpc_floor --port 50999   # serve until killed (the bench starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from typing import Any

import grpc

from benchmarks.measure import free_port, ghz_latency
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc

STATS_PROTO = "viewevents/v1/stats_service.proto"


class _Empty(pb_grpc.StatsServiceServicer):
    async def GetMediaStats(  # noqa: N802 - gRPC method name
        self, request: pb.GetMediaStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMediaStatsResponse:
        return pb.GetMediaStatsResponse()


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_StatsServiceServicer_to_server(_Empty(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def measure(requests: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """ghz_latency of `requests` against a bare server in its own process."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.grpc_floor", "--port", str(port)])
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        return ghz_latency(
            address,
            "viewevents.v1.StatsService/GetMediaStats",
            STATS_PROTO,
            requests,
            concurrency,
            process.pid,
        )
    finally:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args(argv).port))


if __name__ == "__main__":
    main()
