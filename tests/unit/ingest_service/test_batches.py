"""BatchBuilder.add_run (a partition's records in one run, straight into aiokafka's record
builder) against add_to one record at a time through the public append: the same batches with
the same records, on aiokafka's real BatchBuilder and on a batch without its internals."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

from aiokafka.producer.message_accumulator import BatchBuilder as AiokafkaBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from ingest_service.batches import Batch, BatchBuilder, _record_builder

HEADERS = [("content-type", b"application/x-protobuf")]


class Counted:
    """An aiokafka batch that holds at most `capacity` records, seen only through its public
    methods (no record builder to reach)."""

    def __init__(self, capacity: int) -> None:
        self._inner = AiokafkaBatchBuilder(1 << 20, 0)
        self._capacity = capacity

    def append(self, **record: Any) -> object | None:
        if self._inner.record_count() >= self._capacity:
            return None
        return self._inner.append(**record)

    def record_count(self) -> int:
        return int(self._inner.record_count())

    def _build(self) -> Any:
        return self._inner._build()


def _records(batch: Any) -> list[tuple[int, bytes, bytes, list[tuple[str, bytes]]]]:
    built = MemoryRecords(bytes(batch._build())).next_batch()
    assert built is not None
    return [(r.offset, r.key, r.value, list(r.headers)) for r in built]


def _one_by_one(
    builder: BatchBuilder, partition: int, keys: list[bytes], values: list[bytes]
) -> list[Batch]:
    full: list[Batch] = []
    for key, value in zip(keys, values):
        shipped = builder.add_to(partition, key, value)
        if shipped is not None:
            full.append(shipped[1])
    return full


def _compare(new_batch: Callable[[], Batch], seed: int, exact: bool) -> None:
    """Both ways hold the same records per partition, in order, in batches numbered from 0.
    With `exact`, the same batch boundaries too (aiokafka sizes a record with its timestamp
    delta, so its boundaries may move by a record when the clock ticks between the two)."""
    rng = random.Random(seed)
    by_run = BatchBuilder(new_batch, lambda key: 0, HEADERS)
    by_record = BatchBuilder(new_batch, lambda key: 0, HEADERS)
    shipped_run: dict[int, list[Any]] = {p: [] for p in range(4)}
    shipped_one: dict[int, list[Any]] = {p: [] for p in range(4)}
    for _ in range(rng.randint(1, 6)):  # several requests, each a run per partition
        for partition in rng.sample(range(4), rng.randint(1, 4)):
            count = rng.choice([0, 1, 5, 40, 200])
            keys = [str(rng.randrange(10**6)).encode() for _ in range(count)]
            values = [rng.randbytes(rng.choice([0, 10, 31, 120])) for _ in range(count)]
            shipped_run[partition] += by_run.add_run(partition, keys, values)
            shipped_one[partition] += _one_by_one(by_record, partition, keys, values)
    for partition, batch in by_run.drain():
        shipped_run[partition].append(batch)
    for partition, batch in by_record.drain():
        shipped_one[partition].append(batch)
    for partition in range(4):
        run = [_records(b) for b in shipped_run[partition]]
        one = [_records(b) for b in shipped_one[partition]]
        if exact:
            assert run == one
        assert [r[1:] for b in run for r in b] == [r[1:] for b in one for r in b]
        assert all([r[0] for r in b] == list(range(len(b))) for b in run)


def test_a_run_fills_aiokafka_batches_as_one_append_per_record() -> None:
    assert _record_builder(AiokafkaBatchBuilder(1000, 0)) is not None  # the C path is tested
    for seed in range(30):
        size = _batch_bytes(seed)
        _compare(partial(AiokafkaBatchBuilder, size, 0), seed, exact=False)


def test_a_run_takes_the_public_append_when_the_batch_is_not_aiokafkas() -> None:
    for seed in range(30):
        capacity = random.Random(seed).choice([1, 3, 50])
        _compare(partial(Counted, capacity), seed, exact=True)


def _batch_bytes(seed: int) -> int:
    return random.Random(-seed).choice([300, 1000, 4096, 64 * 1024])
