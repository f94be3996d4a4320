"""The byte bound of a consumer batch: the next batch takes fewer records when the last one
wrote more than `batch_bytes` (the batch in flight must not grow with what a record writes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka.structs import TopicPartition

from tests.unit.viewevents.test_consumer import consumer, record
from tests.unit.viewevents.test_consumer_linger import TP0, QueuedFetch, fetched
from viewevents.consumer import BATCH_BYTES_MIN_RECORDS, batch_limit
from viewevents.state.transaction import Transaction
from viewevents.v1 import view_event_pb2 as ve

MiB = 1024 * 1024


def test_batch_limit_scales_the_records_to_the_byte_budget() -> None:
    # 1,000 records wrote 4 MiB: a 1 MiB budget allows a quarter as many.
    assert batch_limit(4_000, 4 * MiB, 1 * MiB, 20_000) == 1_000
    assert batch_limit(10_000, 4 * MiB, 8 * MiB, 20_000) == 20_000  # capped by batch_max
    assert batch_limit(10_000, 16 * MiB, 8 * MiB, 20_000) == 5_000
    # Never below the floor (nor above batch_max when that is lower than the floor).
    assert batch_limit(1_000, 1_000 * MiB, 1 * MiB, 20_000) == BATCH_BYTES_MIN_RECORDS
    assert batch_limit(100, 1_000 * MiB, 1 * MiB, 50) == 50


def test_batch_limit_off_or_without_a_measure_is_batch_max() -> None:
    assert batch_limit(1_000, 100 * MiB, 0, 20_000) == 20_000
    assert batch_limit(0, 0, 8 * MiB, 20_000) == 20_000
    assert batch_limit(1_000, 0, 8 * MiB, 20_000) == 20_000


def test_batch_limit_converges_under_fixed_plus_per_record_costs() -> None:
    """A batch writes fixed bytes (rows touched by any batch) plus bytes per record: repeated,
    the limit settles where a batch writes about the budget, from above and from below."""
    fixed, per_record, budget = 2 * MiB, 600, 8 * MiB
    for start in (20_000, 600):
        limit = start
        for _ in range(30):
            limit = batch_limit(limit, fixed + per_record * limit, budget, 20_000)
        written = fixed + per_record * limit
        assert 0.97 * budget <= written <= 1.01 * budget, (start, limit, written)


class Writes:
    """A processor that writes `size` bytes per event (as a service whose rows grew)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def apply(self, partition: int, events: list[ve.ViewEvent], txn: Transaction) -> None:
        for event in events:
            txn.put(b"x" + event.event_id.encode(), b"v" * self.size)

    def committed(self) -> None:
        pass


def test_a_batch_that_wrote_more_than_the_budget_shortens_the_next(tmp_path: Path) -> None:
    made, _ = consumer(tmp_path, batch_max=20_000, batch_bytes=1 * MiB)
    made.processor = Writes(1_000)
    tp = TopicPartition("t", 0)
    made.apply_batch({tp: [record(0, n, f"e{n}", 20_000) for n in range(2_000)]})
    # About 2 MB written by 2,000 records: the next may take about 1,000 (1 MiB).
    assert 900 <= made.batch_limit <= 1_050
    made.processor = Writes(10)
    made.apply_batch({tp: [record(0, n, f"e{n}", 20_000) for n in range(2_000, 3_000)]})
    assert made.batch_limit == 20_000  # small writes again: back to batch_max


def test_without_a_byte_budget_batches_stay_at_batch_max(tmp_path: Path) -> None:
    made, _ = consumer(tmp_path, batch_max=20_000)
    made.processor = Writes(10_000)
    made.apply_batch({TopicPartition("t", 0): [record(0, n, f"e{n}", 20_000) for n in range(500)]})
    assert made.batch_limit == 20_000


def test_the_linger_waits_only_for_what_the_byte_bound_allows(tmp_path: Path) -> None:
    made, _ = consumer(tmp_path, batch_min=600, linger_ms=2_000)
    made.batch_limit = 300
    queued = QueuedFetch([{TP0: fetched(200, 200)}, {TP0: fetched(400, 100)}])
    made._fetch = queued  # type: ignore[assignment]
    batches = asyncio.run(made._linger({TP0: fetched(0, 200)}, 0.01))
    assert queued.calls == [100]  # asked for no more than the limit allows
    assert batches[TP0].offsets == list(range(400))  # then stopped: 400 >= min(600, 300)
