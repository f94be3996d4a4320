"""Bounded staleness against the real broker: ingest holds writes back while a watched consumer
group is too far behind, goes on once it caught up or stopped moving, and a real consumer's
group offsets reach the end of what it applied (what ingest reads) even when the stream stops."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support import (
    ServiceProcess,
    free_port,
    read_topic,
    stack_config,
    test_config,
    unique_name,
    wait_for,
)
from tests.support.broker import end_offsets
from tests.support.data import make_events
from tests.support.positions import stats_position, wait_applied
from viewevents.group_lag import GroupLagReader
from viewevents.v1 import ingest_service_pb2 as pb
from viewevents.v1 import ingest_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload
from viewevents_tools import settings_catalogue as settings

MAX_LAG = 100


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    return 0.0


def commit_group(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit `offsets` for `group` as a consumer that applied that far would."""

    async def commit() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in offsets])
            await consumer.commit({TopicPartition(topic, p): o for p, o in offsets.items()})
        finally:
            await consumer.stop()

    asyncio.run(commit())


def probe() -> pb.PublishRequest:
    event = ve.ViewEvent(
        event_id=unique_name("probe"),
        media_id=5,
        user_id=77,
        event_type=ve.EVENT_TYPE_STREAM_START,
        event_time=Timestamp(seconds=int(time.time()) - 5),
    )
    return pb.PublishRequest(events=[event])


def start_ingest(config: settings.Config, log: Path) -> ServiceProcess:
    service = ServiceProcess("ingest_service", config, config.ingest_address, log).start()
    service.wait_serving()
    return service


@pytest.fixture
def watched(kafka_bootstrap: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, str]]:
    group = unique_name("watched")
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        ingest_metrics_port=free_port(),
        ingest_lag_groups=group,
        ingest_max_lag_records=MAX_LAG,
        ingest_lag_poll_ms=50,
        ingest_lag_stall_seconds=8.0,
    )
    service = start_ingest(config, tmp_path / "ingest.log")
    yield service, group
    assert service.stop() == 0, service.tail()


def test_writes_wait_while_the_watched_group_is_behind_and_go_on_when_it_catches_up_or_stalls(
    watched: tuple[ServiceProcess, str],
) -> None:
    ingest, group = watched
    config = ingest.config
    port = config.ingest_metrics_port
    topic, bootstrap = config.view_topic, config.kafka_bootstrap
    events, _ = make_events(1_000, seed=5, bad_share=0)
    with grpc.insecure_channel(ingest.address, options=CHANNEL_OPTIONS) as channel:
        first = upload(channel, iter(events[:500]), batch_size=100)
        assert first.accepted == 500
        halfway = {p: end // 2 for p, end in end_offsets(bootstrap, topic).items()}
        commit_group(bootstrap, group, topic, halfway)  # about 250 behind, and moving
        wait_for(lambda: metric(port, "viewevents_ingest_admission_held") == 1, 30)

        # Held: nothing is written however long the call waits (the group does not move).
        stub = pb_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.RpcError) as held:
            stub.Publish(probe(), timeout=1.0)
        assert held.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(read_topic(bootstrap, topic)) == 500

        # The group catches up to within the bound: the waiting call goes through.
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(stub.Publish, probe(), timeout=60)
            ends = end_offsets(bootstrap, topic)
            commit_group(bootstrap, group, topic, ends)
            assert waiting.result(timeout=60).accepted == 1
        assert metric(port, "viewevents_ingest_admission_wait_seconds_total") > 0

        # Behind again, then it stops moving: after the stall time ingest no longer waits.
        second = upload(channel, iter(events[500:]), batch_size=100)
        assert second.accepted == 500
        wait_for(lambda: metric(port, "viewevents_ingest_admission_held") == 1, 30)
        assert stub.Publish(probe(), timeout=60).accepted == 1
    assert len(read_topic(bootstrap, topic)) == 1_002


def test_a_consumers_group_offsets_reach_what_it_applied_once_the_stream_stops(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = stack_config(kafka_bootstrap, tmp_path)
    ingest = start_ingest(config, tmp_path / "ingest.log")
    stats = ServiceProcess("stats_service", config, config.stats_address, tmp_path / "s.log")
    stats.start().wait_serving()
    try:
        events, _ = make_events(6_000, seed=6, bad_share=0)
        with grpc.insecure_channel(ingest.address, options=CHANNEL_OPTIONS) as channel:
            for part in (events[:5_000], events[5_000:]):  # the second soon after the first
                summary = upload(channel, iter(part), batch_size=1_000)
                wait_applied(
                    config.stats_address,
                    stats_position,
                    {p.partition: p.offset for p in summary.positions},
                    timeout=90,
                )

        async def lag() -> int:
            reader = GroupLagReader(kafka_bootstrap, config.view_topic, [config.stats_group])
            try:
                return (await reader.read())[config.stats_group].records
            finally:
                await reader.close()

        wait_for(lambda: asyncio.run(lag()) == 0, 30, interval=0.1)
    finally:
        assert stats.stop() == 0, stats.tail()
        assert ingest.stop() == 0, ingest.tail()
