"""A stats instance whose process stands still past the session timeout (a long pause, a stalled
host) is dropped by its group and taken back when it runs again. It keeps answering for the
partitions it was caught up on while it works through the events that arrived meanwhile,
instead of refusing every query until it has caught up (on a 10M-event stream that was minutes
of UNAVAILABLE for a single instance). A partition another member moved on in between is not
kept: tests/unit/viewevents/test_consumer_rebalance.py.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from tests.support import ServiceProcess, end_offsets, free_port, test_config, wait_for
from viewevents.kafka import user_key
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve

MEDIA = 7


def _events(first: int, count: int) -> list[tuple[bytes, bytes]]:
    """(key, value) records: waypoints of one media item by many users, distinct event ids."""
    records = []
    for n in range(first, first + count):
        event = ve.ViewEvent(
            event_id=f"e{n}",
            media_id=MEDIA,
            user_id=1 + n % 5_000,
            event_type=ve.EVENT_TYPE_WAYPOINT,
        )
        event.event_time.seconds = 1_700_000_000 + n % 86_400
        records.append((user_key(event.user_id), event.SerializeToString()))
    return records


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
        await producer.start()
        try:
            for at in range(0, len(records), 5_000):
                sent = [
                    producer.send(topic, value, key=key) for key, value in records[at : at + 5_000]
                ]
                await asyncio.gather(*[await future for future in sent])
        finally:
            await producer.stop()

    asyncio.run(send())


def _group_state(bootstrap: str, group: str) -> str:
    async def describe() -> str:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            response = (await admin.describe_consumer_groups([group]))[0]
            return str(response.groups[0][2])  # (error, group, state, protocol type, ...)
        finally:
            await admin.close()

    return asyncio.run(describe())


def _answer(address: str) -> pb.GetMediaStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.StatsServiceStub(channel).GetMediaStats(
            pb.GetMediaStatsRequest(media_id=MEDIA), timeout=10
        )


def test_an_instance_taken_back_answers_while_it_works_through_the_backlog(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    config = test_config(
        kafka_bootstrap,
        stats_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(tmp_path / "state"),
        consumer_session_timeout_ms=6_000,  # the broker's least
        topic_partitions=2,
    )
    stats = ServiceProcess("stats_service", config, config.stats_address, tmp_path / "s.log")
    try:
        stats.start().wait_serving()
        _produce(kafka_bootstrap, config.view_topic, _events(0, 20_000))
        first = end_offsets(kafka_bootstrap, config.view_topic)

        def applied() -> dict[int, int] | None:
            try:
                reply = _answer(stats.address)
            except grpc.RpcError:
                return None  # not applied yet (NOT_FOUND) or not answering
            return {p.partition: p.offset for p in reply.position.partitions}

        wait_for(lambda: applied() == first, 60, message="the first events applied")
        assert stats.process is not None
        stats.process.send_signal(signal.SIGSTOP)
        try:
            # The backlog arrives while the instance stands still, and the group drops it.
            _produce(kafka_bootstrap, config.view_topic, _events(20_000, 300_000))
            wait_for(
                lambda: _group_state(kafka_bootstrap, config.stats_group) == "Empty",
                60,
                message="the group dropped the stopped instance",
            )
        finally:
            stats.process.send_signal(signal.SIGCONT)
        ends = end_offsets(kafka_bootstrap, config.view_topic)
        wait_for(
            lambda: "took this instance back" in stats.log_path.read_text(errors="replace"),
            60,
            message=lambda: f"the group took the instance back: {stats.tail()}",
        )
        reply = _answer(stats.address)  # answered, not UNAVAILABLE until caught up
        offsets = {p.partition: p.offset for p in reply.position.partitions}
        assert set(offsets) == set(first) and reply.position.caught_up
        assert all(offsets[p] >= first[p] for p in first)
        assert sum(offsets.values()) < sum(ends.values()), "the backlog was gone before the query"
        # Exact for its position: every event below it, each waypoint 30 s (one user per 5,000).
        assert reply.stats.view_time_seconds == 30 * sum(offsets.values())
        wait_for(lambda: applied() == ends, 120, message="the backlog applied")
    finally:
        stats.stop()
