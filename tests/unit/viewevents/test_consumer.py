"""The shared consume step without Kafka: de-duplication, its bounded memory, offsets with state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp

from viewevents import consumer as consumer_module
from viewevents.config import CONSUMER_SETTINGS, load
from viewevents.consumer import ExactlyOnceConsumer, SeenIds
from viewevents.state.keys import seen_prefix
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction
from viewevents.v1 import view_event_pb2 as ve

DAY_MS = 86_400_000


class Collect:
    """A processor that remembers what it was given."""

    def __init__(self) -> None:
        self.applied: list[tuple[int, str]] = []

    def apply(self, partition: int, events: list[ve.ViewEvent], txn: Transaction) -> None:
        self.applied += [(partition, e.event_id) for e in events]

    def committed(self) -> None:
        pass


def record(
    partition: int, offset: int, event_id: str, day: int, valid: bool = True
) -> ConsumerRecord:
    event = ve.ViewEvent(
        event_id=event_id,
        media_id=1 if valid else 0,
        user_id=2,
        event_type=ve.EVENT_TYPE_WAYPOINT,
        event_time=Timestamp(seconds=day * 86_400),
    )
    return ConsumerRecord(
        "t", partition, offset, day * DAY_MS, 0, b"2", event.SerializeToString(), None, 0, 0, []
    )


def consumer(
    tmp_path: Path, retention_days: int = 3, **options: Any
) -> tuple[ExactlyOnceConsumer, Collect]:
    processor = Collect()
    # Built without start(): _apply is the unit under test; no broker is contacted.
    c = ExactlyOnceConsumer(
        bootstrap="127.0.0.1:1",
        topic="t",
        group_id="g",
        store=StateStore(str(tmp_path / "db")),
        processor=processor,
        dedupe_retention_days=retention_days,
        **options,
    )
    return c, processor


def test_duplicates_dropped_within_retention_counted_after(tmp_path: Path) -> None:
    c, processor = consumer(tmp_path, retention_days=3)
    c.apply_batch(
        {
            TopicPartition("t", 0): [
                record(0, 0, "a", 100),
                record(0, 1, "b", 100),
                record(0, 2, "a", 100),
                record(0, 3, "bad", 100, valid=False),
            ]
        }
    )
    c.apply_batch(
        {TopicPartition("t", 0): [record(0, 4, "b", 103)]}
    )  # 3 days later: still a duplicate
    c.apply_batch(
        {TopicPartition("t", 0): [record(0, 5, "a", 104)]}
    )  # 4 days after first: counts again
    c.apply_batch(
        {TopicPartition("t", 1): [record(1, 0, "a", 104)]}
    )  # other partition: its own record
    assert processor.applied == [(0, "a"), (0, "b"), (0, "a"), (1, "a")]
    assert (c.stats.duplicates, c.stats.invalid) == (2, 1)
    assert c.positions == {0: 6, 1: 1}
    assert c.store.stored_offsets("t", [0, 1, 2]) == {0: 6, 1: 1}  # committed with the state


def test_sweep_keeps_the_record_bounded(tmp_path: Path) -> None:
    c, _ = consumer(tmp_path, retention_days=2)
    offset = 0
    for day in range(100, 130):  # a month of 500 new ids a day
        batch = [record(0, offset + n, f"{day}-{n}", day) for n in range(500)]
        offset += len(batch)
        c.apply_batch({TopicPartition("t", 0): batch})
    prefix = seen_prefix(0)
    remembered = [key for key, _ in c.store.scan_prefix(prefix)]
    days = {int(key[len(prefix) :].split(b"-")[0]) for key in remembered}
    # Ids of the last `retention` days are all kept; the sweep (2 keys per event) removed the rest
    # except at most about half a retention period's worth that it has not reached yet.
    assert {127, 128, 129} <= days
    assert all(
        f"{d}-{n}".encode() in {k[len(prefix) :] for k in remembered}
        for d in (128, 129)
        for n in range(500)
    )
    assert len(remembered) <= 500 * (2 + 1 + 2)
    assert min(days) >= 129 - 5


def test_seen_ids_first_copy_wins_and_order_is_kept(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "db"))
    seen = SeenIds(retention_days=30)
    events = [ve.ViewEvent(event_id=i, media_id=n) for n, i in enumerate(["x", "y", "x", "z", "y"])]
    txn = Transaction(store)
    fresh, duplicates = seen.keep_new(0, events, 5, txn)
    assert [(e.event_id, e.media_id) for e in fresh] == [("x", 0), ("y", 1), ("z", 3)]
    assert duplicates == 2 and fresh[0] is events[0]


def test_records_without_a_value_are_skipped_not_fatal(tmp_path: Path) -> None:
    """A tombstone (null value) written by another producer must not stop the consumer."""
    c, processor = consumer(tmp_path)
    tombstone = ConsumerRecord("t", 0, 1, 100 * DAY_MS, 0, b"2", None, None, 0, 0, [])
    c.apply_batch(
        {TopicPartition("t", 0): [record(0, 0, "a", 100), tombstone, record(0, 2, "b", 100)]}
    )
    assert processor.applied == [(0, "a"), (0, "b")]
    assert c.stats.invalid + c.stats.undecodable == 1
    assert c.store.stored_offsets("t", [0]) == {0: 3}


def test_the_session_timeout_setting_reaches_the_kafka_consumer(tmp_path: Path) -> None:
    """How fast a dead instance's partitions move on is the operator's choice, not a constant."""
    config = load(CONSUMER_SETTINGS, env={"VIEWEVENTS_CONSUMER_SESSION_TIMEOUT_MS": "7500"})
    assert config.consumer_session_timeout_ms == 7_500
    assert load(CONSUMER_SETTINGS, env={}).consumer_session_timeout_ms == 10_000
    made, _ = consumer(tmp_path, session_timeout_ms=config.consumer_session_timeout_ms)
    options = made._consumer_options
    assert (options["session_timeout_ms"], options["heartbeat_interval_ms"]) == (7_500, 250)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 250),
        ({"VIEWEVENTS_CONSUMER_HEARTBEAT_INTERVAL_MS": "400"}, 400),
        # Never more than a third of the session timeout: Kafka wants several per session.
        ({"VIEWEVENTS_CONSUMER_HEARTBEAT_INTERVAL_MS": "5000"}, 3_333),
        (
            {
                "VIEWEVENTS_CONSUMER_HEARTBEAT_INTERVAL_MS": "3000",
                "VIEWEVENTS_CONSUMER_SESSION_TIMEOUT_MS": "6000",
            },
            2_000,
        ),
    ],
)
def test_the_heartbeat_interval_setting_reaches_the_kafka_consumer(
    tmp_path: Path, env: dict[str, str], expected: int
) -> None:
    """A member learns of a rebalance only from its next heartbeat, and the group waits for it:
    the interval is what a join or a failover waits, so it is a setting, capped by the session."""
    config = load(CONSUMER_SETTINGS, env=env)
    made, _ = consumer(
        tmp_path,
        session_timeout_ms=config.consumer_session_timeout_ms,
        heartbeat_interval_ms=config.consumer_heartbeat_interval_ms,
    )
    assert made._consumer_options["heartbeat_interval_ms"] == expected


def test_a_batch_minimum_above_the_maximum_is_capped_by_it(tmp_path: Path) -> None:
    """Else the linger would wait its whole time on every fetch for records it may not take."""
    made, _ = consumer(tmp_path, batch_max=1_000, batch_min=5_000)
    assert made.batch_min == 1_000


def _noisy_values(seed: int, count: int) -> list[bytes]:
    """Valid events, events that decode but do not apply, non-canonical and broken bytes."""
    rng = random.Random(seed)
    values = []
    for n in range(count):
        event = ve.ViewEvent(
            event_id=rng.choice([f"e{n}", "", "é-id", f"e{n % 7}"]),
            media_id=rng.choice([1, 5, 0, -3, 2**40]),
            user_id=rng.choice([2, 9, 0]),
            event_type=cast(ve.EventType, rng.choice([1, 2, 3, 4, 0, 9])),
        )
        if rng.random() < 0.9:
            event.event_time.CopyFrom(Timestamp(seconds=rng.choice([86_400, 1_750_000_000, 0])))
        data = bytearray(event.SerializeToString())
        kind = rng.randrange(8)
        if kind == 0 and data:
            del data[rng.randrange(len(data)) :]  # truncated
        elif kind == 1:
            data += bytes([0x10, 0x05])  # media_id again: legal, not canonical, the last wins
        elif kind == 2:
            data += bytes([0x38, 0x01])  # an unknown field
        values.append(bytes(data))
    return values


@pytest.mark.parametrize("size", [1, 5, 127, 128, 300])
def test_small_batches_decode_by_protobuf_as_the_scan_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A batch of fewer than SCAN_MIN_RECORDS records skips the columnar scan (its fixed cost
    dwarfs a lone event's decoding): the events, the invalid and the undecodable are the same."""
    values = _noisy_values(size, size)
    decoded = []
    for scan_min in (0, 10**9):  # always scanned, never scanned
        monkeypatch.setattr(consumer_module, "SCAN_MIN_RECORDS", scan_min)
        made, _ = consumer(tmp_path / str(scan_min))
        batch = made._decode(values)
        decoded.append(
            (
                batch.event_id,
                batch.media_id.tolist(),
                batch.user_id.tolist(),
                batch.event_type.tolist(),
                batch.seconds.tolist(),
                batch.values,
                made.stats.invalid,
                made.stats.undecodable,
            )
        )
    assert decoded[0] == decoded[1]
    assert decoded[0][6] + decoded[0][7] > 0 or size < 5  # the mix holds rejected records
