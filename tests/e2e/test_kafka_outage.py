"""Kafka goes away under running services: health says so, logs stay readable, SIGTERM still
exits promptly with RocksDB consistent, and a restart counts everything exactly once.

Each test runs a broker of its own on free ports (never the shared test broker), stops it
under the services and always stops it at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import REPO, ServiceProcess, free_port, stack_config
from tests.support.data import make_events
from viewevents.kafka import KeyPartitioner
from viewevents.state.keys import seen_prefix
from viewevents.state.store import StateStore
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents_client.uploads import CHANNEL_OPTIONS, upload
from viewevents_tools import settings_catalogue as settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXIT_BOUND_S = 15.0
PROBLEM_LINE = re.compile(r" (WARNING|ERROR|CRITICAL) ")
MODULES = {
    "ingest": "ingest_service",
    "stats": "stats_service",
    "recommender": "recommender_service",
}


class OwnBroker:
    """A single-node broker on free ports whose data survives a stop, for outage tests."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.env = dict(
            os.environ,
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(free_port()),
            KAFKA_DATA_DIR=str(data_dir),
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run([str(REPO / "deploy" / "kafka.sh"), "start"], env=self.env, check=True)

    def stop(self) -> None:
        subprocess.run([str(REPO / "deploy" / "kafka.sh"), "stop"], env=self.env, check=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[OwnBroker]:
    own = OwnBroker(tmp_path / "kafka")
    own.start()
    try:
        yield own
    finally:
        own.stop()


def health(address: str) -> int | None:
    """The overall grpc.health.v1 status, or None when the server does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        return reply.status
    except grpc.RpcError:
        return None


def wait_health(address: str, wanted: int, timeout: float) -> float:
    """Seconds until `address` reports `wanted`; fails after `timeout`."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        last = health(address)
        if last == wanted:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{address} health {last}, not {wanted}, after {timeout} s")


def problem_lines(service: ServiceProcess, skip: int) -> list[str]:
    lines = service.log_path.read_text(errors="replace").splitlines()[skip:]
    return [line for line in lines if PROBLEM_LINE.search(line)]


def line_count(service: ServiceProcess) -> int:
    return len(service.log_path.read_text(errors="replace").splitlines())


def start_all(config: settings.Config, tmp_path: Path, run: int) -> dict[str, ServiceProcess]:
    addresses = {
        "ingest": config.ingest_address,
        "stats": config.stats_address,
        "recommender": config.recommender_address,
    }
    return {
        name: ServiceProcess(
            MODULES[name], config, addresses[name], tmp_path / f"{name}-{run}.log"
        ).start()
        for name in MODULES
    }


def sigterm_and_time(service: ServiceProcess) -> tuple[float, int | None]:
    """Seconds from SIGTERM to exit (capped a little past the bound), and the exit code."""
    assert service.process is not None
    started = time.monotonic()
    service.process.terminate()
    try:
        code = service.process.wait(EXIT_BOUND_S + 10)
    except subprocess.TimeoutExpired:
        service.kill()
        return time.monotonic() - started, None
    return time.monotonic() - started, code


def expected_stats(events: list) -> dict[int, tuple[int, int]]:
    """(starts, view seconds) per media over unique event ids, computed here, not by a service."""
    unique = {e.event_id: e for e in events}.values()
    starts = Counter(e.media_id for e in unique if e.event_type == 1)
    view = Counter(e.media_id for e in unique if e.event_type == 2)
    return {m: (starts[m], 30 * view[m]) for m in {e.media_id for e in unique}}


def seen_ids_per_partition(state_dir: str, partitions: int) -> dict[int, int]:
    """How many event ids a RocksDB store remembers per partition (opened after the exit:
    a store left half-written or still locked fails here)."""
    store = StateStore(state_dir)
    try:
        return {p: sum(1 for _ in store.scan_prefix(seen_prefix(p))) for p in range(partitions)}
    finally:
        store.close()


def configuration(broker: OwnBroker, tmp_path: Path) -> settings.Config:
    return stack_config(broker.bootstrap, tmp_path, producer_timeout_ms=4_000)


def upload_and_wait(config: settings.Config, events: list) -> dict[int, int]:
    """Upload through ingest, then wait until stats and the recommender applied it; returns
    the topic's end offsets."""
    with grpc.insecure_channel(config.ingest_address, options=CHANNEL_OPTIONS) as channel:
        summary = upload(channel, iter(events), timeout=120)
    targets = {p.partition: p.offset for p in summary.positions}
    deadline = time.monotonic() + 120
    with (
        grpc.insecure_channel(config.stats_address) as stats_channel,
        grpc.insecure_channel(config.recommender_address) as rec_channel,
    ):
        stats = pb_grpc.StatsServiceStub(stats_channel)
        rec = rec_grpc.RecommenderServiceStub(rec_channel)
        while True:
            try:
                positions = [
                    stats.ListTopMedia(
                        pb.ListTopMediaRequest(
                            start_time={"seconds": 0}, end_time={"seconds": 1}, limit=1
                        ),
                        timeout=5,
                    ).position,
                    rec.RecommendForUser(
                        rec_pb.RecommendForUserRequest(user_id=events[0].user_id), timeout=5
                    ).position,
                ]
                if all(
                    all(
                        {p.partition: p.offset for p in position.partitions}.get(p, 0) >= o
                        for p, o in targets.items()
                    )
                    for position in positions
                ):
                    return targets
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"not applied: {targets}"
            time.sleep(0.2)


def test_outage_turns_health_not_serving_and_back_with_few_log_lines(
    broker: OwnBroker, tmp_path: Path
) -> None:
    config = configuration(broker, tmp_path)
    services = start_all(config, tmp_path, 0)
    for service in services.values():
        service.wait_serving()
    upload_and_wait(config, make_events(2_000, seed=301, bad_share=0)[0])
    skip = {name: line_count(s) for name, s in services.items()}

    broker.stop()
    outage_started = time.monotonic()
    took = {name: wait_health(s.address, NOT_SERVING, timeout=30) for name, s in services.items()}
    # Stay down for 15 s in all, watching that nobody claims SERVING meanwhile.
    while time.monotonic() - outage_started < 15:
        for name, service in services.items():
            assert health(service.address) == NOT_SERVING, name
        time.sleep(0.5)
    noise = {name: problem_lines(s, skip[name]) for name, s in services.items()}
    broker.start()
    for service in services.values():
        wait_health(service.address, SERVING, timeout=90)

    for name, lines in noise.items():
        assert len(lines) < 20, f"{name} logged {len(lines)} problem lines in 15 s:\n" + "\n".join(
            lines[:40]
        )
    assert all(seconds < 20 for seconds in took.values()), took
    for service in services.values():
        assert sigterm_and_time(service)[1] == 0


def test_sigterm_with_kafka_down_exits_promptly_and_restart_counts_once(
    broker: OwnBroker, tmp_path: Path
) -> None:
    config = configuration(broker, tmp_path)
    services = start_all(config, tmp_path, 0)
    for service in services.values():
        service.wait_serving()
    events = make_events(6_000, seed=302, bad_share=0)[0]
    targets = upload_and_wait(config, events)
    partitions = len(targets)
    partitioner = KeyPartitioner(partitions)
    by_partition = Counter(
        partitioner(str(e.user_id).encode()) for e in {e.event_id: e for e in events}.values()
    )

    broker.stop()
    exits = {name: sigterm_and_time(s) for name, s in services.items()}
    print("seconds to exit with Kafka down:", exits)
    for name, (seconds, code) in exits.items():
        assert code == 0 and seconds < EXIT_BOUND_S, (name, seconds, code, services[name].tail())
    # Both stores open cleanly and hold each unique event id exactly once (a partial or
    # doubled batch would show), computed from the uploaded events here.
    for state_dir in (config.stats_state_dir, config.recommender_state_dir):
        assert seen_ids_per_partition(state_dir, partitions) == dict(by_partition) | {
            p: 0 for p in range(partitions) if p not in by_partition
        }, state_dir

    broker.start()
    services = start_all(config, tmp_path, 1)
    for service in services.values():
        service.wait_serving()
    more = make_events(2_000, seed=303, bad_share=0)[0]
    upload_and_wait(config, more + events[:500])  # with a re-sent slice
    expected = expected_stats(events + more)
    with grpc.insecure_channel(config.stats_address) as channel:
        stub = pb_grpc.StatsServiceStub(channel)
        for media, (starts, view_time) in sorted(expected.items()):
            got = stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=media), timeout=10).stats
            assert (got.starts, got.view_time_seconds) == (starts, view_time), media
    for service in services.values():
        assert sigterm_and_time(service)[1] == 0
