"""Bearer tokens on the stats and recommender queries, and the loopback metrics bind, against
the real services (health and reflection stay open for probes)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import REPO, ServiceProcess, free_port, test_config
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents_client.query_client import QueryClient

STATS_TOKEN, RECOMMENDER_TOKEN = "stats-s3cret", "rec-s3cret"


@pytest.fixture(scope="module")
def services(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    folder = tmp_path_factory.mktemp("tokens")
    config = test_config(
        kafka_bootstrap,
        stats_address=f"127.0.0.1:{free_port()}",
        recommender_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(folder / "stats"),
        recommender_state_dir=str(folder / "rec"),
        stats_metrics_port=free_port(),
        stats_token=STATS_TOKEN,
        recommender_token=RECOMMENDER_TOKEN,
    )
    stats = ServiceProcess("stats_service", config, config.stats_address, folder / "stats.log")
    recommender = ServiceProcess(
        "recommender_service", config, config.recommender_address, folder / "rec.log"
    )
    stats.start(), recommender.start()
    try:
        stats.wait_serving()  # health answers without a token
        recommender.wait_serving()
        yield stats, recommender
    finally:
        stats.stop(), recommender.stop()


def top_request() -> stats_pb.ListTopMediaRequest:
    return stats_pb.ListTopMediaRequest(
        start_time=Timestamp(seconds=0), end_time=Timestamp(seconds=3600)
    )


def check_token(call: Callable[..., object], token: str) -> None:
    for metadata in ((), [("authorization", "Bearer wrong")], [("authorization", token)]):
        with pytest.raises(grpc.RpcError) as refused:
            call(metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    call(metadata=[("authorization", f"Bearer {token}")], timeout=10)  # answers


def test_stats_queries_need_the_token(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    stats, _ = services
    with grpc.insecure_channel(stats.address) as channel:
        stub = stats_grpc.StatsServiceStub(channel)
        check_token(lambda **kw: stub.ListTopMedia(top_request(), **kw), STATS_TOKEN)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetMediaStats(stats_pb.GetMediaStatsRequest(media_id=1), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_recommender_queries_need_the_token(
    services: tuple[ServiceProcess, ServiceProcess],
) -> None:
    _, recommender = services
    with grpc.insecure_channel(recommender.address) as channel:
        stub = rec_grpc.RecommenderServiceStub(channel)
        request = rec_pb.RecommendForUserRequest(user_id=5, limit=3)
        check_token(lambda **kw: stub.RecommendForUser(request, **kw), RECOMMENDER_TOKEN)
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_client_and_cli_send_the_tokens(services: tuple[ServiceProcess, ServiceProcess]) -> None:
    stats, recommender = services
    with QueryClient(
        stats.address,
        recommender.address,
        stats_token=STATS_TOKEN,
        recommender_token=RECOMMENDER_TOKEN,
    ) as client:
        assert (
            len(
                client.top_media(
                    top_request().start_time.ToDatetime(), top_request().end_time.ToDatetime()
                ).media
            )
            == 0
        )
        client.recommend(5, 3)
    with QueryClient(stats.address, recommender.address) as client:
        with pytest.raises(grpc.RpcError) as missing:
            client.recommend(5, 3)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    addresses = ["--stats-address", stats.address, "--recommender-address", recommender.address]
    cli = [sys.executable, "-m", "viewevents_tools.cli"]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TOKEN")}
    flagged = subprocess.run(
        [*cli, "top", *addresses, "--stats-token", STATS_TOKEN, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert flagged.returncode == 0, flagged.stderr
    by_env = subprocess.run(
        [*cli, "recommend", "5", *addresses, "--json"],
        cwd=REPO,
        env={**env, "VIEWEVENTS_RECOMMENDER_TOKEN": RECOMMENDER_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert by_env.returncode == 0, by_env.stderr
    refused = subprocess.run(
        [*cli, "top", *addresses], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def metrics_answer(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_service_metrics_bind_loopback_by_default(
    services: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    stats, _ = services
    port = stats.config.stats_metrics_port
    assert metrics_answer("127.0.0.1", port)
    assert not metrics_answer("127.0.0.2", port)  # a 0.0.0.0 listener would answer here
