"""The bulk fetch's pieces that need no broker: the fallback decision, the getmany view, and the
consumer storing the next offset of a fetch that held only skipped records (transaction markers).
Its records are compared with aiokafka's getmany in tests/integration/test_kafka_fetch.py."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from viewevents.consumer import ExactlyOnceConsumer
from viewevents.kafka_fetch import BulkFetch, FetchedRecords
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction


def test_getmany_records_give_the_same_view() -> None:
    records = [ConsumerRecord("t", 0, offset, 1_000 + offset, 0, None, b"v%d" % offset, None, 0, 2, ())
               for offset in (5, 6, 9)]
    fetched = FetchedRecords.from_consumer_records(records)
    assert (fetched.offsets, fetched.values) == ([5, 6, 9], [b"v5", b"v6", b"v9"])
    assert (fetched.last_timestamp, fetched.next_offset, len(fetched)) == (1_009, 10, 3)


@pytest.mark.parametrize("started", [False, True])
def test_falls_back_to_getmany_when_internals_are_not_as_expected(
        started: bool, caplog: pytest.LogCaptureFixture) -> None:
    async def check() -> bool:
        # Not started: no fetcher yet. Started (nothing listens on port 1; start() only fails
        # later): deserializers would turn values into something else than bytes.
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1", value_deserializer=bytes)
        if started:
            consumer._fetcher = object()  # what start() would have made, as far as the check goes
        return BulkFetch(consumer).bulk

    with caplog.at_level(logging.WARNING, "viewevents.kafka_fetch"):
        assert asyncio.run(check()) is False
    assert "bulk Kafka fetch off" in caplog.text


class Nothing:
    def apply(self, partition: int, events: list, txn: Transaction) -> None:
        raise AssertionError("no event to apply")

    def committed(self) -> None:
        pass


def test_a_fetch_of_only_skipped_records_still_stores_its_next_offset(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "db"))
    consumer = ExactlyOnceConsumer(bootstrap="127.0.0.1:1", topic="t", group_id="g", store=store,
                                   processor=Nothing())
    consumer.catch_up.assign([0], {})
    consumer.apply_fetched({TopicPartition("t", 0): FetchedRecords([], [], -1, 42)})
    assert store.stored_offsets("t", [0]) == {0: 42}
    assert consumer.positions == {0: 42}
