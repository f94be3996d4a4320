"""A real broker breaks ingest's idempotent producer, and ingest recovers without a restart,
and learns the topic's new record limit.

The trigger: the view topic's `max.message.bytes` is lowered (alter_configs) after ingest read
it at start, and an event under the old limit but over the new one is uploaded. The broker
refuses its batch (MessageSizeTooLarge); the idempotent producer had already numbered that
batch, so without a fresh producer every later batch of that partition failed
(OutOfOrderSequenceNumber) until ingest was restarted. The test checks the topic's contents
against the uploads that were acknowledged: nothing lost, nothing doubled.

Runs on the shared test broker: only a topic-level setting of this test's own topic changes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support import (
    TEST_KAFKA_PORT,
    ServiceProcess,
    free_port,
    read_topic,
    test_config,
    wait_for,
)
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

USER = 7  # every event goes to this user's partition: the one whose sequence breaks
PADDING = 300_000  # bytes: under the limit ingest read at start (~1 MiB), over the new one
NEW_LIMIT = 100_000


def event(event_id: str, padding: int = 0) -> ve.ViewEvent:
    message = ve.ViewEvent(
        event_id=event_id,
        media_id=3,
        user_id=USER,
        event_type=ve.EVENT_TYPE_WAYPOINT,
        event_time=Timestamp(seconds=int(time.time()) - 60),
    )
    if padding:  # an unknown field (31): kept in the record, so it counts towards its size
        message.MergeFromString(b"\xfa\x01" + varint(padding) + b"p" * padding)
    return message


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


async def set_max_message_bytes(bootstrap: str, topic: str, value: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(value)})]
        )
    finally:
        await admin.close()


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[ServiceProcess]:
    config = test_config(
        f"127.0.0.1:{TEST_KAFKA_PORT}",
        ingest_address=f"127.0.0.1:{free_port()}",
        producer_timeout_ms=10_000,
    )
    service = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "ingest.log"
    ).start()
    service.wait_serving()
    yield service
    service.stop()


def try_upload(channel: grpc.Channel, events: list[ve.ViewEvent]) -> grpc.StatusCode | None:
    """None when the upload was acknowledged, else its status code."""
    try:
        summary = upload(channel, iter(events), timeout=60)
    except grpc.RpcError as error:
        return error.code()
    assert summary.accepted == len(events), summary
    return None


def test_a_batch_the_broker_refuses_does_not_poison_later_uploads(
    ingest: ServiceProcess,
) -> None:
    config = ingest.config
    accepted: list[ve.ViewEvent] = []
    with grpc.insecure_channel(ingest.address, options=CHANNEL_OPTIONS) as channel:
        before = [event(f"before-{i}") for i in range(50)]
        assert try_upload(channel, before) is None
        accepted += before

        asyncio.run(set_max_message_bytes(config.kafka_bootstrap, config.view_topic, NEW_LIMIT))
        started = time.monotonic()
        code = try_upload(channel, [event("too-big", PADDING)])
        took = time.monotonic() - started
        assert code is not None, "the broker refused the batch, so the upload must fail"
        assert took < 30, f"the failed upload took {took:.0f} s"
        print("refused upload:", code, f"after {took:.1f} s")

        attempts = 0

        def later_upload_succeeds() -> bool:
            nonlocal attempts
            attempts += 1
            batch = [event(f"after-{attempts}-{i}") for i in range(50)]
            outcome = try_upload(channel, batch)
            if outcome is None:
                accepted.extend(batch)
                return True
            print("later upload failed:", outcome)
            return False

        started = time.monotonic()
        wait_for(later_upload_succeeds, 60, interval=0.5, message="uploads keep failing")
        print(f"recovered after {attempts} attempt(s), {time.monotonic() - started:.1f} s")
        more = [event(f"last-{i}") for i in range(50)]
        assert try_upload(channel, more) is None
        accepted += more
        # The refused batch made ingest re-read the topic's limit: the same event is now
        # rejected up front (TOO_LARGE, dead-lettered) instead of failing the RPC.
        summary = upload(channel, iter([event("too-big-again", PADDING)]), timeout=60)
        assert (summary.accepted, summary.rejected) == (0, 1), summary
        assert summary.rejections[0].field_violations[0].reason == "TOO_LARGE"

    stored = Counter(
        ve.ViewEvent.FromString(r.value).event_id
        for r in read_topic(config.kafka_bootstrap, config.view_topic)
    )
    assert stored == Counter(e.event_id for e in accepted)
