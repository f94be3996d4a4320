"""A production restart: kill -9, then the same service with the same consumer group and state."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc

from tests.support.configs import free_port, test_config, unique_name
from tests.support.data import make_events
from tests.support.positions import stats_position, wait_applied
from tests.support.processes import ServiceProcess
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents_client.uploads import CHANNEL_OPTIONS, upload


def test_kill_and_restart_in_the_same_group_counts_everything_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        stats_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(tmp_path / "stats"),
        stats_group=unique_name("same"),
    )
    ingest = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "i.log"
    ).start()
    stats = ServiceProcess(
        "stats_service", config, config.stats_address, tmp_path / "s0.log"
    ).start()
    ingest.wait_serving()
    stats.wait_serving()
    first, _ = make_events(20_000, seed=81, bad_share=0)
    second, _ = make_events(20_000, seed=82, bad_share=0)
    with grpc.insecure_channel(config.ingest_address, options=CHANNEL_OPTIONS) as channel:
        summary = upload(channel, iter(first))
        wait_applied(
            config.stats_address,
            stats_position,
            {p.partition: p.offset for p in summary.positions},
            timeout=90,
        )
        stats.kill()
        stats = ServiceProcess(
            "stats_service", config, config.stats_address, tmp_path / "s1.log"
        ).start()
        summary = upload(channel, iter(second + first[:5_000]))  # with a re-sent slice
    stats.wait_serving(timeout=120)
    wait_applied(
        config.stats_address,
        stats_position,
        {p.partition: p.offset for p in summary.positions},
        timeout=90,
    )

    unique = {e.event_id: e for e in first + second}.values()
    starts = Counter(e.media_id for e in unique if e.event_type == 1)
    view_time: Counter[int] = Counter()
    for e in unique:
        if e.event_type == 2:
            view_time[e.media_id] += 30
    with grpc.insecure_channel(config.stats_address) as channel:
        stub = pb_grpc.StatsServiceStub(channel)
        for media in sorted({e.media_id for e in unique}):
            got = stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=media)).stats
            assert (got.starts, got.view_time_seconds) == (starts[media], view_time[media]), media
    assert "resuming from stored offsets" in stats.tail(200)
    stats.stop()
    ingest.stop()
