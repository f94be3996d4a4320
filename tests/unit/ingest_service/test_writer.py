"""PartitionedWriter's parts against a fake producer (no Kafka): batching, the in-flight bound
(back-pressure), the ack deadline, failures and abandon."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from ingest_service.writer import PartitionedWriter


@dataclass
class FakeBatch:
    capacity: int
    records: list[tuple[bytes, bytes]] = field(default_factory=list)

    def append(
        self,
        *,
        timestamp: float | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key or b"", value or b""))
        return object()

    def record_count(self) -> int:
        return len(self.records)


@dataclass
class Metadata:
    partition: int
    offset: int


class FakeProducer:
    """Records every batch sent; each batch's acknowledgement is resolved by the test."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self.sent: list[tuple[int, FakeBatch, asyncio.Future]] = []
        self.offsets: dict[int, int] = {}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.sent.append((partition, batch, future))
        return future

    def ack(self, index: int) -> None:
        partition, batch, future = self.sent[index]
        base = self.offsets.get(partition, 0)
        self.offsets[partition] = base + batch.record_count()
        future.set_result(Metadata(partition, base))

    def unacked(self) -> int:
        return sum(not f.done() for _, _, f in self.sent)


def writer(producer: FakeProducer, inflight: int = 2, timeout: float = 5.0) -> PartitionedWriter:
    return PartitionedWriter(producer, "t", lambda key: int(key) % 2, [], inflight, timeout)


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def test_records_are_batched_per_partition_and_flush_waits_for_every_ack() -> None:
    async def run() -> None:
        producer = FakeProducer(capacity=2)
        w = writer(producer, inflight=8)
        for n in range(5):  # keys 0,2,4 -> partition 0; 1,3 -> partition 1
            await w.append(str(n).encode(), b"v%d" % n)
        assert [(p, b.record_count()) for p, b, _ in producer.sent] == [(0, 2)]
        flushing = asyncio.ensure_future(w.flush())
        await until(lambda: len(producer.sent) == 3)
        assert not flushing.done()
        for i in range(3):
            producer.ack(i)
        await flushing
        assert w.end_offsets == {0: 3, 1: 2}
        assert sorted(v for _, b, _ in producer.sent for _, v in b.records) == [
            b"v%d" % n for n in range(5)
        ]

    asyncio.run(run())


def test_at_most_n_batches_in_flight_and_a_slow_ack_blocks_the_next_send() -> None:
    async def run() -> None:
        producer = FakeProducer(capacity=1)
        w = writer(producer, inflight=2)
        appending = asyncio.ensure_future(_append(w, range(10)))
        await until(lambda: len(producer.sent) == 2)
        await asyncio.sleep(0.05)  # give a wrong implementation the chance to send more
        assert len(producer.sent) == 2 and producer.unacked() == 2
        assert not appending.done(), "the third batch must wait for an acknowledgement"
        producer.ack(0)
        await until(lambda: len(producer.sent) == 3)
        assert producer.unacked() <= 2
        while not appending.done():
            for i, (_, _, f) in enumerate(producer.sent):
                if not f.done():
                    producer.ack(i)
                    break
            await asyncio.sleep(0.001)
            assert producer.unacked() <= 2
        await appending

    asyncio.run(run())


async def _append(w: PartitionedWriter, numbers: range) -> None:
    for n in numbers:
        await w.append(str(n).encode(), b"x")


def test_an_ack_timeout_raises_kafka_timeout_error() -> None:
    async def run() -> None:
        producer = FakeProducer(capacity=1)
        w = writer(producer, inflight=1, timeout=0.05)
        await w.append(b"0", b"x")
        with pytest.raises(KafkaTimeoutError):  # the servicer maps KafkaError to UNAVAILABLE
            await w.flush()

    asyncio.run(run())


def test_a_failed_batch_fails_the_flush() -> None:
    async def run() -> None:
        producer = FakeProducer(capacity=1)
        w = writer(producer, inflight=4)
        await w.append(b"0", b"x")
        await w.append(b"1", b"y")
        flushing = asyncio.ensure_future(w.flush())
        await until(lambda: len(producer.sent) == 2)
        producer.ack(1)
        producer.sent[0][2].set_exception(OutOfOrderSequenceNumber())
        with pytest.raises(OutOfOrderSequenceNumber):
            await flushing

    asyncio.run(run())


def test_abandon_releases_every_slot_and_consumes_late_failures() -> None:
    async def run() -> None:
        producer = FakeProducer(capacity=1)
        w = writer(producer, inflight=2)
        for key in (b"0", b"2", b"4"):  # one partition, one record per batch: two go out
            await w.append(key, b"x")
        assert len(producer.sent) == 2 and producer.unacked() == 2
        w.abandon()
        for _, _, future in producer.sent:
            future.set_exception(OutOfOrderSequenceNumber())  # nobody waits: must not be logged
        for key in (b"6", b"8", b"10"):  # room again: two more go out without any ack
            await asyncio.wait_for(w.append(key, b"y"), 1)
        assert len(producer.sent) == 4
        w.abandon()
        await asyncio.wait_for(w.flush(), 1)  # nothing pending, nothing open
        assert len(producer.sent) == 4

    asyncio.run(run())
