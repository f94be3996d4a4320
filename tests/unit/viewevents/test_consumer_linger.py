"""The consumer's linger: short fetches of a flowing stream are joined into one batch, a lone
event is not held back, and joined fetches keep offset order (or drop what will be re-read)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition

from viewevents.consumer import (
    LINGER_MIN_GAIN,
    ExactlyOnceConsumer,
    join_fetches,
    linger_seconds,
)
from viewevents.kafka_fetch import FetchedRecords
from viewevents.state.store import StateStore

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


def fetched(first: int, count: int, next_offset: int | None = None) -> FetchedRecords:
    offsets = list(range(first, first + count))
    return FetchedRecords(
        offsets,
        [b"v%d" % o for o in offsets],
        1000 + first + count,
        first + count if next_offset is None else next_offset,
    )


def test_linger_only_for_a_short_batch_of_a_flowing_stream() -> None:
    # 300 records 20 ms after the previous fetch: 15,000/s, a 30 ms wait brings about 450.
    assert linger_seconds(300, 0.02, 5000, 0.03) == 0.03
    # A lone event (an idle probe), even right after another fetch: applied at once.
    assert linger_seconds(1, 0.0, 5000, 0.03) == 0.0
    assert linger_seconds(1, 0.2, 5000, 0.03) == 0.0
    # A trickle: 50 records over a second would bring 1.5 more.
    assert linger_seconds(50, 1.0, 5000, 0.03) == 0.0
    # Enough already, or lingering switched off.
    assert linger_seconds(5000, 0.001, 5000, 0.03) == 0.0
    assert linger_seconds(300, 0.02, 5000, 0.0) == 0.0
    assert linger_seconds(300, 0.02, 1, 0.03) == 0.0
    # The threshold itself: the expected gain is compared with LINGER_MIN_GAIN.
    rate_needed = LINGER_MIN_GAIN / 0.03
    assert linger_seconds(int(rate_needed * 0.1) + 1, 0.1, 5000, 0.03) == 0.03
    assert linger_seconds(int(rate_needed * 0.1) - 1, 0.1, 5000, 0.03) == 0.0


def test_extend_continues_offsets_and_keeps_the_last_time() -> None:
    first = fetched(10, 3)
    first.extend(fetched(13, 2))
    assert first.offsets == [10, 11, 12, 13, 14]
    assert first.values == [b"v10", b"v11", b"v12", b"v13", b"v14"]
    assert first.next_offset == 15 and first.last_timestamp == 1015
    # Control batches only (no records) move the next offset, not the time.
    first.extend(FetchedRecords([], [], -1, 17))
    assert first.next_offset == 17 and first.last_timestamp == 1015
    # A gap (skipped control records) is a continuation too.
    first.extend(fetched(19, 1))
    assert first.offsets[-1] == 19 and first.next_offset == 20


def test_extend_refuses_records_that_go_back() -> None:
    first = fetched(10, 3)
    with pytest.raises(ValueError):
        first.extend(fetched(12, 4))
    with pytest.raises(ValueError):
        first.extend(FetchedRecords([], [], -1, 11))
    assert first.offsets == [10, 11, 12] and first.next_offset == 13


def test_join_fetches_per_partition_and_after_a_seek_back() -> None:
    batches = {TP0: fetched(0, 3)}
    join_fetches(batches, {TP0: fetched(3, 2), TP1: fetched(7, 1)})
    assert batches[TP0].offsets == [0, 1, 2, 3, 4]
    assert batches[TP1].offsets == [7]
    # Partition 0 was sought back to offset 2 (a rebalance): its earlier records are read
    # again, so only the later ones are kept (nothing twice, nothing out of order).
    join_fetches(batches, {TP0: fetched(2, 4)})
    assert batches[TP0].offsets == [2, 3, 4, 5]
    assert batches[TP0].next_offset == 6


class QueuedFetch:
    """Stands in for BulkFetch: returns queued results, then waits out the timeout empty."""

    def __init__(self, results: list[dict[TopicPartition, FetchedRecords]]) -> None:
        self.results = results
        self.calls: list[int] = []

    async def getmany(
        self, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, FetchedRecords]:
        self.calls.append(max_records)
        if self.results:
            return self.results.pop(0)
        await asyncio.sleep(timeout_ms / 1000)
        return {}


def make_consumer(tmp_path: Path, batch_min: int, linger_ms: int) -> ExactlyOnceConsumer:
    async def make() -> ExactlyOnceConsumer:
        return ExactlyOnceConsumer(
            bootstrap="127.0.0.1:1",
            topic="t",
            group_id="g",
            store=StateStore(str(tmp_path / "db")),
            processor=object(),  # type: ignore[arg-type] # not called by _linger
            batch_min=batch_min,
            linger_ms=linger_ms,
        )

    return asyncio.run(make())


def test_linger_joins_fetches_until_batch_min(tmp_path: Path) -> None:
    consumer = make_consumer(tmp_path, batch_min=600, linger_ms=2000)
    queued = QueuedFetch(
        [{TP0: fetched(200, 200)}, {TP1: fetched(0, 150)}, {TP0: fetched(400, 100)}]
    )
    consumer._fetch = queued  # type: ignore[assignment]
    batches = asyncio.run(consumer._linger({TP0: fetched(0, 200)}, 0.01))
    assert batches[TP0].offsets == list(range(500))
    assert batches[TP1].offsets == list(range(150))
    assert queued.results == []  # stopped at 650 >= 600: nothing more asked for
    assert len(queued.calls) == 3
    assert queued.calls[0] == consumer.batch_max - 200  # never more than batch_max in all


def test_linger_ends_at_its_deadline(tmp_path: Path) -> None:
    consumer = make_consumer(tmp_path, batch_min=5000, linger_ms=50)
    consumer._fetch = QueuedFetch([{TP0: fetched(200, 200)}])  # type: ignore[assignment]
    began = time.monotonic()
    batches = asyncio.run(consumer._linger({TP0: fetched(0, 200)}, 0.01))
    assert batches[TP0].offsets == list(range(400))
    assert time.monotonic() - began < 1.0  # the deadline, not batch_min, ended it


def test_no_linger_for_a_lone_event(tmp_path: Path) -> None:
    consumer = make_consumer(tmp_path, batch_min=5000, linger_ms=30)
    queued = QueuedFetch([{TP0: fetched(1, 1)}])
    consumer._fetch = queued  # type: ignore[assignment]
    batches = asyncio.run(consumer._linger({TP0: fetched(0, 1)}, 0.0))
    assert batches[TP0].offsets == [0]
    assert queued.calls == []
