"""Writes records to Kafka in per-partition batches and knows when all are acknowledged.

One writer serves one RPC, so "acknowledged" is exact per upload. Building batches ourselves
(instead of one producer.send per event) keeps the per-event cost to a C-level append. The
parts: `BatchBuilder` decides batches, `FlowController` bounds the unacknowledged ones (gRPC
back-pressure), and this class ships batches through the producer and applies the ack deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from aiokafka.errors import KafkaTimeoutError

from ingest_service.batches import Batch, BatchBuilder
from ingest_service.columns import murmur2_partitions
from ingest_service.flow_control import FlowController
from viewevents.kafka import KeyPartitioner
from viewevents.metrics import RECORDS_PRODUCED

_Shipped = tuple[asyncio.Future, int]  # the batch's acknowledgement and its record count


class PartitionedWriter:
    def __init__(
        self,
        producer: Any,  # AIOKafkaProducer, or a fake with create_batch and send_batch
        topic: str,
        partitioner: Callable[[bytes], int],  # KeyPartitioner, or a test's own
        headers: Sequence[tuple[str, bytes]],
        max_inflight_batches: int,
        ack_timeout_seconds: float = 30.0,
    ) -> None:
        self.producer = producer
        self._topic = topic
        self._ack_timeout = ack_timeout_seconds
        self._partitioner = partitioner
        self._batches = BatchBuilder(producer.create_batch, partitioner, headers)
        self._flow: FlowController[_Shipped] = FlowController(
            max_inflight_batches, self._acknowledged
        )
        self.records = 0
        self._unacknowledged_records = 0
        self.end_offsets: dict[int, int] = {}  # partition -> offset past the last acked record

    async def append(self, key: bytes, value: bytes) -> None:
        full = self._batches.add(key, value)
        if full is not None:
            await self._ship(*full)
        self.records += 1
        self._unacknowledged_records += 1

    async def append_many(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Append records, each partition's in order, their partitions computed for all at
        once and each partition's records appended in one run; awaits only to ship full
        batches (one call per request instead of one coroutine per event)."""
        partitions = self._partitions_of(keys)
        present = np.unique(partitions).tolist() if len(keys) else []
        for partition in present:
            if len(present) == 1:
                run_keys, run_values = keys, values
            else:
                rows = np.flatnonzero(partitions == partition).tolist()
                run_keys = [keys[i] for i in rows]
                run_values = [values[i] for i in rows]
            for batch in self._batches.add_run(partition, run_keys, run_values):
                await self._ship(partition, batch)
        self.records += len(keys)
        self._unacknowledged_records += len(keys)

    def _partitions_of(self, keys: Sequence[bytes]) -> np.ndarray:
        count = getattr(self._partitioner, "partitions", None)
        if isinstance(self._partitioner, KeyPartitioner) and isinstance(count, int):
            return murmur2_partitions(keys, count)
        return np.array(list(map(self._partitioner, keys)), np.int64)  # a test's own partitioner

    async def _ship(self, partition: int, batch: Batch) -> None:
        await self._flow.acquire()
        future = await self.producer.send_batch(batch, self._topic, partition=partition)
        self._flow.release_later((future, batch.record_count()))

    async def flush(self) -> None:
        """Send the partly filled batches and wait until Kafka acknowledged every record."""
        for partition, batch in self._batches.drain():
            await self._ship(partition, batch)
        await self._flow.drain()
        RECORDS_PRODUCED.labels(self._topic).inc(self._unacknowledged_records)
        self._unacknowledged_records = 0

    async def _acknowledged(self, shipped: _Shipped) -> None:
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
                f"no acknowledgement within {self._ack_timeout:.0f} s"
            ) from None
        end = metadata.offset + count  # metadata.offset is the batch's base offset
        if end > self.end_offsets.get(metadata.partition, -1):
            self.end_offsets[metadata.partition] = end

    def abandon(self) -> None:
        """Forget pending work after a failure (their futures may still resolve; nobody waits)."""
        self._batches.clear()
        for future, _ in self._flow.abandon():
            future.add_done_callback(_consume_exception)


def _consume_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
