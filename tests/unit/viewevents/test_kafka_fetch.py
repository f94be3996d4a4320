"""The bulk fetch's pieces that need no broker: the fallback decision, the getmany view, and the
consumer storing the next offset of a fetch that held only skipped records (transaction markers),
and `_drain` against aiokafka's own FetchResult.getall on hand-built v2 and legacy batches (plain
and gzip, read from inside a batch), and a drained record set freed at once (not by the cyclic
garbage collector). On a real topic, tests/integration/test_kafka_fetch.py."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, FetchResult, PartitionRecords
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord, TopicPartition

from viewevents.consumer import ExactlyOnceConsumer
from viewevents.kafka_fetch import BulkFetch, FetchedRecords, _drain
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction


def test_getmany_records_give_the_same_view() -> None:
    records = [
        ConsumerRecord("t", 0, offset, 1_000 + offset, 0, None, b"v%d" % offset, None, 0, 2, ())
        for offset in (5, 6, 9)
    ]
    fetched = FetchedRecords.from_consumer_records(records)
    assert (fetched.offsets, fetched.values) == ([5, 6, 9], [b"v5", b"v6", b"v9"])
    assert (fetched.last_timestamp, fetched.next_offset, len(fetched)) == (1_009, 10, 3)


@pytest.mark.parametrize("started", [False, True])
def test_falls_back_to_getmany_when_internals_are_not_as_expected(
    started: bool, caplog: pytest.LogCaptureFixture
) -> None:
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


class _Rebalancing:
    """The slice of a started AIOKafkaConsumer that the bulk fetch reads, stuck in a rebalance:
    subscribed, no assignment yet, and none coming."""

    def __init__(self) -> None:
        self._closed = False
        self._subscription = SubscriptionState()
        self._subscription.subscribe({"t"})
        self._coordinator = self
        self._fetcher = self
        self._subscriptions = self._subscription
        self._records: dict = {}

    def check_errors(self) -> None:
        pass


def test_a_fetch_during_a_rebalance_returns_when_its_timeout_is_up() -> None:
    """aiokafka's own wait for the next assignment has no limit, so a consumer loop waiting in
    it would not see a stop request until the rebalance ended (a whole session timeout or more)."""

    async def fetch() -> tuple[dict, bool]:
        fetch = BulkFetch.__new__(BulkFetch)
        fetch._consumer = fetch_consumer = _Rebalancing()
        fetch.bulk = True
        assert fetch_consumer._subscription.reassignment_in_progress
        batches = await asyncio.wait_for(fetch.getmany(timeout_ms=50, max_records=10), 10)
        return batches, fetch_consumer._subscription.reassignment_in_progress

    assert asyncio.run(fetch()) == ({}, True)


class Nothing:
    def apply(self, partition: int, events: list, txn: Transaction) -> None:
        raise AssertionError("no event to apply")

    def committed(self) -> None:
        pass


def test_a_fetch_of_only_skipped_records_still_stores_its_next_offset(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "db"))
    consumer = ExactlyOnceConsumer(
        bootstrap="127.0.0.1:1", topic="t", group_id="g", store=store, processor=Nothing()
    )
    consumer.catch_up.assign([0], {})
    consumer.apply_fetched({TopicPartition("t", 0): FetchedRecords([], [], -1, 42)})
    assert store.stored_offsets("t", [0]) == {0: 42}
    assert consumer.positions == {0: 42}


class _State:
    """The slice of aiokafka's TopicPartitionState that FetchResult reads and moves."""

    def __init__(self, position: int) -> None:
        self.paused = False
        self.position = position

    def consumed_to(self, position: int) -> None:
        self.position = position


class _Assignment:
    def __init__(self, position: int) -> None:
        self.active = True
        self.state = _State(position)

    def state_value(self, tp: TopicPartition) -> _State:
        return self.state


def _log(parts: list[tuple[str, int, int]]) -> bytes:
    """Record batches (kind, codec, records) at consecutive offsets, as a fetch returns them."""
    data = b""
    offset = 0
    for kind, codec, count in parts:
        if kind == "v2":
            builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 1 << 20)
            for i in range(count):
                builder.append(i, 1_000 + offset + i, b"k", b"v%d" % (offset + i), [])
            batch = bytearray(builder.build())
            batch[0:8] = offset.to_bytes(8, "big")  # the broker assigns the base offset
        else:
            builder = LegacyRecordBatchBuilder(1, codec, 1 << 20)
            for i in range(count):
                # Legacy inner offsets are relative when compressed, absolute when not.
                builder.append(
                    i if codec else offset + i, 1_000 + offset + i, b"k", b"v%d" % (offset + i)
                )
            batch = bytearray(builder.build())
            if codec:
                batch[0:8] = (offset + count - 1).to_bytes(8, "big")  # wrapper: last offset
        data += bytes(batch)
        offset += count
    return data


@pytest.mark.parametrize("start", [0, 3, 7, 12, 30])
@pytest.mark.parametrize("kind", ["v2", "legacy"])
def test_drain_reads_what_getall_reads(kind: str, start: int) -> None:
    data = _log([(kind, 0, 5), (kind, 1, 10), (kind, 0, 1), (kind, 1, 20)])  # codec 1: gzip
    tp = TopicPartition("t", 0)

    def result() -> tuple[FetchResult, _Assignment]:
        assignment = _Assignment(start)
        records = PartitionRecords(
            tp, MemoryRecords(data), [], start, None, None, True, READ_UNCOMMITTED
        )
        return FetchResult(
            tp, assignment=assignment, partition_records=records, backoff=0
        ), assignment

    public, public_assignment = result()
    expected = [(r.offset, r.value, r.timestamp) for r in public.getall()]
    mine, assignment = result()
    got: list[tuple[int, bytes | None, int]] = []
    while mine.has_more():
        fetched = _drain(tp, mine, 4)
        assert fetched is not None
        got += [(o, v, -1) for o, v in zip(fetched.offsets, fetched.values)]
        if fetched.values:
            got[-1] = (*got[-1][:2], fetched.last_timestamp)
        assert fetched.next_offset == assignment.state.position
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got if g[2] != -1] == [e[2] for e, g in zip(expected, got) if g[2] != -1]
    assert assignment.state.position == public_assignment.state.position


def test_a_drained_record_set_is_freed_without_waiting_for_the_garbage_collector() -> None:
    # aiokafka's PartitionRecords and its records generator reference each other; left so, every
    # drained record set (up to max_partition_fetch_bytes) waits for a full collection.
    tp = TopicPartition("t", 0)
    records = PartitionRecords(
        tp, MemoryRecords(_log([("v2", 0, 5)])), [], 0, None, None, True, READ_UNCOMMITTED
    )
    result = FetchResult(tp, assignment=_Assignment(0), partition_records=records, backoff=0)
    alive = weakref.ref(records)
    del records
    gc.disable()
    try:
        fetched = _drain(tp, result, 100)
        assert fetched is not None and len(fetched) == 5
        assert not result.has_more()
        del result
        assert alive() is None
    finally:
        gc.enable()
