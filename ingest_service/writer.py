"""Writes records to Kafka in per-partition batches and knows when all are acknowledged.

One writer serves one RPC, so "acknowledged" is exact per upload. Building batches ourselves
(instead of one producer.send per event) keeps the per-event cost to a C-level append; the
bound on unacknowledged batches is what turns Kafka's pace into gRPC back-pressure.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from viewevents.kafka import KeyPartitioner
from viewevents.metrics import RECORDS_PRODUCED


class PartitionedWriter:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partitioner: KeyPartitioner,
        headers: Sequence[tuple[str, bytes]],
        max_inflight_batches: int,
        ack_timeout_seconds: float = 30.0,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._partitioner = partitioner
        self._headers = list(headers)
        self._max_inflight = max_inflight_batches
        self._ack_timeout = ack_timeout_seconds
        self._open: dict[int, object] = {}
        self._inflight: deque[tuple[asyncio.Future, int]] = deque()
        self.records = 0
        self._unacknowledged_records = 0
        self.end_offsets: dict[int, int] = {}  # partition -> offset past the last acked record

    async def append(self, key: bytes, value: bytes) -> None:
        partition = self._partitioner(key)
        batch = self._open.get(partition)
        if batch is None:
            batch = self._open[partition] = self._producer.create_batch()
        if batch.append(timestamp=None, key=key, value=value, headers=self._headers) is None:
            await self._ship(partition, batch)
            batch = self._open[partition] = self._producer.create_batch()
            if batch.append(timestamp=None, key=key, value=value, headers=self._headers) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit in a Kafka batch")
        self.records += 1
        self._unacknowledged_records += 1

    async def _ship(self, partition: int, batch: object) -> None:
        count = batch.record_count()  # type: ignore[attr-defined]
        future = await self._producer.send_batch(batch, self._topic, partition=partition)
        self._inflight.append((future, count))
        while len(self._inflight) > self._max_inflight:
            await self._acknowledged(self._inflight.popleft())

    async def flush(self) -> None:
        """Send the partly filled batches and wait until Kafka acknowledged every record."""
        open_batches, self._open = self._open, {}
        for partition, batch in open_batches.items():
            if batch.record_count():  # type: ignore[attr-defined]
                await self._ship(partition, batch)
        while self._inflight:
            await self._acknowledged(self._inflight.popleft())
        RECORDS_PRODUCED.labels(self._topic).inc(self._unacknowledged_records)
        self._unacknowledged_records = 0

    async def _acknowledged(self, shipped: tuple[asyncio.Future, int]) -> None:
        """Wait for one batch's acknowledgement, within the deadline.

        With idempotence on, aiokafka retries a batch forever rather than expire it; the RPC must
        not hang that long, so it fails (UNAVAILABLE) and the client retries. A batch that Kafka
        stores after all is then stored twice, which consumers absorb by event id.
        """
        future, count = shipped
        try:
            metadata = await asyncio.wait_for(future, self._ack_timeout)
        except TimeoutError:
            raise KafkaTimeoutError(
                f"no acknowledgement within {self._ack_timeout:.0f} s") from None
        end = metadata.offset + count  # metadata.offset is the batch's base offset
        if end > self.end_offsets.get(metadata.partition, -1):
            self.end_offsets[metadata.partition] = end

    def abandon(self) -> None:
        """Forget pending work after a failure (their futures may still resolve; nobody waits)."""
        self._open.clear()
        for future, _ in self._inflight:
            future.add_done_callback(_consume_exception)
        self._inflight.clear()


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
