"""The ingest service against the real broker: what is acknowledged is in Kafka, exactly."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support.broker import broker_env, kafka_sh, read_topic
from tests.support.configs import free_port, test_config
from tests.support.data import NOW, make_events
from tests.support.processes import ServiceProcess
from viewevents.kafka import KeyPartitioner
from viewevents.rpc.errors import field_violations_of
from viewevents.v1 import ingest_service_pb2 as pb
from viewevents.v1 import ingest_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload


@pytest.fixture(scope="module")
def ingest(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        max_events_per_request=5_000,
        max_request_bytes=2 * 1024 * 1024,
    )
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    service = ServiceProcess("ingest_service", config, config.ingest_address, log).start()
    service.wait_serving()
    yield service
    assert service.stop() == 0, service.tail()


@pytest.fixture
def channel(ingest: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(ingest.address, options=CHANNEL_OPTIONS) as ch:
        yield ch


def test_upload_100k_lands_exactly_the_valid_events(
    ingest: ServiceProcess, channel: grpc.Channel
) -> None:
    events, broken = make_events(100_000, seed=11)
    broken_ids = {id(e) for e, _ in broken}
    valid = [e for e in events if id(e) not in broken_ids]

    summary = upload(channel, iter(events), batch_size=2_000)

    assert (summary.received, summary.accepted, summary.rejected) == (
        len(events),
        len(valid),
        len(broken),
    )
    assert summary.requests == 50
    # The summary lists the first rejections in stream order, with the right indexes.
    first_broken = [n for n, e in enumerate(events) if id(e) in broken_ids][
        : len(summary.rejections)
    ]
    assert [r.index for r in summary.rejections] == first_broken
    for rejection in summary.rejections:
        expected = next(v for e, v in broken if e is events[rejection.index])
        assert {(v.field, v.reason) for v in rejection.field_violations} == expected

    config = ingest.config
    records = read_topic(config.kafka_bootstrap, config.view_topic)
    assert Counter(r.value for r in records) == Counter(e.SerializeToString() for e in valid)
    # The summary says how far the upload reached in each partition (for freshness waits).
    ends: dict[int, int] = {}
    for record in records:
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    assert {p.partition: p.offset for p in summary.positions} == ends
    partitioner = KeyPartitioner(len({r.partition for r in records}))
    for record in records:
        event = ve.ViewEvent.FromString(record.value)
        assert record.key == str(event.user_id).encode()
        assert record.partition == partitioner(record.key)  # Kafka's default partitioning by key
        assert dict(record.headers)["content-type"].endswith(b"viewevents.v1.ViewEvent")

    dead = read_topic(config.kafka_bootstrap, config.dead_letter_topic)
    assert len(dead) == len(broken)
    expected_dead = Counter(e.SerializeToString() for e, _ in broken)
    got_dead: Counter[bytes] = Counter()
    for record in dead:
        rejected = ve.RejectedEvent.FromString(record.value)
        got_dead[rejected.event.SerializeToString()] += 1
        expected = next(v for e, v in broken if e == rejected.event)
        assert {(v.field, v.reason) for v in rejected.field_violations} == expected
        assert rejected.source == "Upload" and rejected.reject_time.seconds > 0
    assert got_dead == expected_dead


def test_garbage_in_the_middle_does_not_sink_the_stream(
    ingest: ServiceProcess, channel: grpc.Channel
) -> None:
    good_before, _ = make_events(300, seed=21, bad_share=0)
    good_after, _ = make_events(300, seed=22, bad_share=0)
    garbage = [
        # 99: a number the enum does not name.
        ve.ViewEvent(
            event_id="\u2603" * 3, media_id=-1, user_id=-2, event_type=cast(ve.EventType, 99)
        ),
        ve.ViewEvent(),
        ve.ViewEvent(event_id="x" * 1000, event_time=Timestamp(seconds=-(10**10))),
    ]
    stub = pb_grpc.IngestServiceStub(channel)
    summary = stub.Upload(
        iter(
            [
                pb.UploadRequest(events=good_before),
                pb.UploadRequest(events=garbage * 50),
                pb.UploadRequest(events=good_after),
            ]
        )
    )
    assert (summary.accepted, summary.rejected) == (600, 150)
    records = read_topic(ingest.config.kafka_bootstrap, ingest.config.view_topic)
    landed = {r.value for r in records}
    assert all(e.SerializeToString() in landed for e in good_before + good_after)


def test_unparseable_request_is_invalid_argument(channel: grpc.Channel) -> None:
    raw_upload = channel.stream_unary(
        "/viewevents.v1.IngestService/Upload",
        request_serializer=lambda b: b,
        response_deserializer=pb.UploadSummary.FromString,
    )
    with pytest.raises(grpc.RpcError) as failure:
        raw_upload(iter([b"\x0a\xff\xff\xff\xff\x0f garbage that is not protobuf"]))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be parsed as viewevents.v1.UploadRequest" in failure.value.details()
    assert [v.reason for v in field_violations_of(failure.value)] == ["UNPARSEABLE"]


def test_oversized_requests_are_resource_exhausted(channel: grpc.Channel) -> None:
    stub = pb_grpc.IngestServiceStub(channel)
    too_many, _ = make_events(5_001, seed=31, bad_share=0)
    with pytest.raises(grpc.RpcError) as failure:
        stub.Upload(iter([pb.UploadRequest(events=too_many)]))
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5001 events; at most 5000" in failure.value.details()

    huge = [
        ve.ViewEvent(
            event_id="y" * 200,
            media_id=1,
            user_id=1,
            event_type=ve.EVENT_TYPE_WAYPOINT,
            event_time=Timestamp(seconds=NOW),
        )
        for _ in range(4_000)
    ]  # ~0.9 MB
    with pytest.raises(grpc.RpcError) as failure:
        stub.Upload(iter([pb.UploadRequest(events=huge * 3)]))
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_publish_partial_and_all_invalid(ingest: ServiceProcess, channel: grpc.Channel) -> None:
    stub = pb_grpc.IngestServiceStub(channel)
    good = ve.ViewEvent(
        event_id="pub-1",
        media_id=3,
        user_id=4,
        event_type=ve.EVENT_TYPE_STREAM_START,
        event_time=Timestamp(seconds=NOW - 5),
    )
    bad = ve.ViewEvent(
        event_id="pub-2",
        media_id=3,
        user_id=0,
        event_type=ve.EVENT_TYPE_STREAM_START,
        event_time=Timestamp(seconds=NOW - 5),
    )
    reply = stub.Publish(pb.PublishRequest(events=[good, bad]))
    assert (reply.accepted, reply.rejected) == (1, 1)
    assert [(r.index, r.event_id) for r in reply.rejections] == [(1, "pub-2")]
    assert good.SerializeToString() in {
        r.value for r in read_topic(ingest.config.kafka_bootstrap, ingest.config.view_topic)
    }

    with pytest.raises(grpc.RpcError) as failure:
        stub.Publish(pb.PublishRequest(events=[good, bad][1:] + [ve.ViewEvent(event_id="z")]))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {(v.field, v.reason) for v in field_violations_of(failure.value)}
    assert ("events[0].user_id", "REQUIRED") in fields
    assert ("events[1].media_id", "REQUIRED") in fields and (
        "events[1].event_time",
        "REQUIRED",
    ) in fields

    with pytest.raises(grpc.RpcError) as failure:
        stub.Publish(pb.PublishRequest())
    assert [v.field for v in field_violations_of(failure.value)] == ["events"]


def test_upload_stream_acks_each_request_once_durable(
    ingest: ServiceProcess, channel: grpc.Channel
) -> None:
    stub = pb_grpc.IngestServiceStub(channel)
    batches = [make_events(400, seed=40 + n, bad_share=0.1) for n in range(5)]
    requests = [
        pb.UploadRequest(events=events, sequence=1000 + n) for n, (events, _) in enumerate(batches)
    ]
    acks = list(stub.UploadStream(iter(requests)))
    assert [(a.request_index, a.sequence) for a in acks] == [(n, 1000 + n) for n in range(5)]
    for ack, (events, broken) in zip(acks, batches):
        assert (ack.received, ack.accepted, ack.rejected) == (400, 400 - len(broken), len(broken))
        assert sorted(r.index for r in ack.rejections) == sorted(
            n for n, e in enumerate(events) if any(e is b for b, _ in broken)
        )
    landed = Counter(
        r.value for r in read_topic(ingest.config.kafka_bootstrap, ingest.config.view_topic)
    )
    for events, broken in batches:
        for event in events:
            if not any(event is b for b, _ in broken):
                assert landed[event.SerializeToString()] >= 1


def test_kafka_down_means_unavailable_and_no_summary(tmp_path: Path) -> None:
    """A broker of its own, stopped under the service: the client must get UNAVAILABLE."""
    port = free_port()
    env = broker_env(port, tmp_path / "kafka", controller_port=free_port())
    kafka_sh("start", env)
    try:
        config = test_config(
            f"127.0.0.1:{port}",
            ingest_address=f"127.0.0.1:{free_port()}",
            producer_timeout_ms=4_000,
        )
        service = ServiceProcess(
            "ingest_service", config, config.ingest_address, tmp_path / "log"
        ).start()
        service.wait_serving()
        kafka_sh("stop", env)
        events, _ = make_events(2_000, seed=51, bad_share=0)
        with grpc.insecure_channel(service.address) as ch:
            with pytest.raises(grpc.RpcError) as failure:
                upload(ch, iter(events), timeout=60)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value
        assert "Kafka did not acknowledge" in failure.value.details()
        started = time.monotonic()
        service.stop()
        assert time.monotonic() - started < 20, "shutdown must not hang when Kafka is gone"
    finally:
        kafka_sh("stop", env, check=False)


def test_sigterm_lets_an_inflight_upload_finish(kafka_bootstrap: str, tmp_path: Path) -> None:
    config = test_config(kafka_bootstrap, ingest_address=f"127.0.0.1:{free_port()}")
    service = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "log"
    ).start()
    process = service.process
    assert process is not None  # set by start()
    service.wait_serving()
    events, _ = make_events(20_000, seed=61, bad_share=0)
    sent = []

    def slow_stream() -> Iterator[pb.UploadRequest]:
        for n in range(20):
            if n == 5:
                process.terminate()  # SIGTERM while the upload is under way
            sent.append(n)
            yield pb.UploadRequest(events=events[n * 1000 : (n + 1) * 1000])
            time.sleep(0.05)

    with grpc.insecure_channel(service.address) as ch:
        summary = pb_grpc.IngestServiceStub(ch).Upload(slow_stream(), timeout=60)
    assert summary.accepted == 20_000
    assert process.wait(30) == 0
    assert len(read_topic(kafka_bootstrap, config.view_topic)) == 20_000
    assert "shutting down" in service.tail(50)
