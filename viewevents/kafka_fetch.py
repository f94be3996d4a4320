"""Fetched Kafka records as plain columns (offsets, values), without a ConsumerRecord each.

aiokafka's public `getmany` builds one `ConsumerRecord` dataclass per record on the event loop
(through a generator per partition), which profiles showed as the consumers' largest cost
while catching up. The consumers need only each record's value, the last record's offset and
time, and the partition's next offset. `BulkFetch.getmany` drains the record batches that
aiokafka's fetcher already received and reads those directly from its C record batches.

THIS MODULE USES AIOKAFKA INTERNALS, written against aiokafka 0.14.0 (pinned in
constraints.txt): `Fetcher._records` ({TopicPartition: FetchResult | FetchError}),
`FetchResult._partition_records` / `check_assignment` / `_update_position` / `has_more`,
`PartitionRecords._records` (MemoryRecords), `_records_iterator`, `next_fetch_offset`,
`_check_crcs`, `_isolation_level`, `_consume_aborted_up_to`, `_contains_abort_marker`, and the
consumer's `_fetcher`, `_coordinator`, `_subscription`. It mirrors `Fetcher.fetched_records` and
`PartitionRecords._unpack_records` of that version: positions move exactly as getmany moves
them, a seek or revocation between fetch and drain drops the stale result, control batches
and (read_committed) aborted transactions are skipped, CRCs are checked. `BulkFetch` checks
these internals once when made and, if anything is not as expected, logs why and uses the
public `getmany` instead (same results, slower). Elsewhere only `viewevents.consumer` reads
the consumer's `_coordinator` (its group generation) and `_client` (its Kafka probe), each
with a fallback when absent.

One difference from getmany: `max_records` is honoured at record-batch granularity (whole
Kafka batches are taken until the budget is reached), so a result may exceed it by at most
one producer batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, FetchResult, PartitionRecords
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)

WRITTEN_FOR_AIOKAFKA = "0.14.0"


@dataclass
class FetchedRecords:
    """One partition's records from one fetch, in offset order, as parallel lists."""

    offsets: list[int]
    values: list[bytes | None]
    last_timestamp: int  # ms, of the last record; -1 when there is none
    next_offset: int  # where reading this partition continues (past skipped control batches)

    def __len__(self) -> int:
        return len(self.values)

    def extend(self, later: FetchedRecords) -> None:
        """Append the same partition's next fetch (a consumer's linger joins several into one
        batch). Offsets must continue where this one ends: a partition that was sought back in
        between (a rebalance) cannot be joined, and raises ValueError."""
        if later.offsets and later.offsets[0] < self.next_offset:
            raise ValueError(
                f"fetch starting at {later.offsets[0]} does not follow one ending at "
                f"{self.next_offset}"
            )
        if later.next_offset < self.next_offset:
            raise ValueError(f"next offset {later.next_offset} before {self.next_offset}")
        self.offsets += later.offsets
        self.values += later.values
        if later.values:
            self.last_timestamp = later.last_timestamp
        self.next_offset = later.next_offset

    @classmethod
    def from_consumer_records(cls, records: Sequence[ConsumerRecord]) -> FetchedRecords:
        """The same view of a public getmany result (or of records built by hand)."""
        last = records[-1]
        return cls(
            [r.offset for r in records], [r.value for r in records], last.timestamp, last.offset + 1
        )


class BulkFetch:
    """`getmany` for a started `AIOKafkaConsumer` that returns `FetchedRecords` per partition."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        problem = _unsupported(consumer)
        self.bulk = problem is None
        if problem is None:
            log.info("bulk Kafka fetch on (aiokafka %s)", aiokafka.__version__)
        else:
            log.warning(
                "bulk Kafka fetch off, using the public getmany (aiokafka %s, written for %s): %s",
                aiokafka.__version__,
                WRITTEN_FOR_AIOKAFKA,
                problem,
            )

    async def getmany(
        self, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, FetchedRecords]:
        """Records fetched so far (waiting up to `timeout_ms` for some), about `max_records`."""
        consumer = self._consumer
        if not self.bulk:
            batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            return {
                tp: FetchedRecords.from_consumer_records(records)
                for tp, records in batches.items()
                if records
            }
        if consumer._closed:
            raise ConsumerStoppedError()
        consumer._coordinator.check_errors()
        with consumer._subscription.fetch_context():
            return await self._fetched(timeout_ms / 1000, max_records)

    async def _fetched(
        self, timeout: float, max_records: int
    ) -> dict[TopicPartition, FetchedRecords]:
        """`Fetcher.fetched_records` (0.14.0) with `_drain` in place of `FetchResult.getall`."""
        fetcher = self._consumer._fetcher
        pending_results: dict[TopicPartition, Any] = fetcher._records
        while True:
            start = time.monotonic()
            if fetcher._subscriptions.reassignment_in_progress:
                # Bounded, unlike aiokafka's own wait: a rebalance can take a whole session
                # timeout or longer, and the caller's loop must still see a stop request.
                try:
                    await asyncio.wait_for(fetcher._subscriptions.wait_for_assignment(), timeout)
                except TimeoutError:
                    return {}
            drained: dict[TopicPartition, FetchedRecords] = {}
            budget = max_records
            for tp in list(pending_results):
                result = pending_results[tp]
                if type(result) is FetchResult:
                    try:
                        fetched = _drain(tp, result, budget)
                    except CorruptRecordException:
                        # Dropped without moving the position: the partition is fetched again.
                        del pending_results[tp]
                        fetcher._notify(fetcher._wait_consume_future)
                        if drained:
                            return drained
                        raise
                    if not result.has_more():
                        del pending_results[tp]
                        fetcher._notify(fetcher._wait_consume_future)
                    if fetched is None:
                        continue
                    drained[tp] = fetched
                    budget -= len(fetched)
                    if budget <= 0:
                        break
                elif drained:
                    return drained  # the error is raised at the next call
                else:
                    del pending_results[tp]
                    fetcher._notify(fetcher._wait_consume_future)
                    result.check_raise()
            if drained or not timeout:
                return drained
            waiter = fetcher._create_fetch_waiter()
            done, pending = await asyncio.wait([waiter], timeout=timeout)
            if not done or fetcher._closed:
                for future in pending:
                    future.cancel()
                return {}
            if waiter.done():
                waiter.result()  # authorization errors and the like
            timeout = max(0.0, timeout - (time.monotonic() - start))


def _drain(tp: TopicPartition, result: FetchResult, budget: int) -> FetchedRecords | None:
    """Whole record batches of `result` until `budget` records are taken; None when the
    result is stale (seek, pause, revocation) or nothing moved."""
    records: PartitionRecords | None = result._partition_records
    if records is not None:
        # The records' own generator (unused here) and the records reference each other, a
        # cycle only a full garbage collection frees: each fetched record set (up to
        # max_partition_fetch_bytes) outlived its draining by a minute or more. Measured on the
        # recommender catching up on 6M events: 50 to 60 MiB of drained record sets alive.
        records._records_iterator = None
    if records is None or not result.check_assignment(tp) or not result.has_more():
        return None
    memory: MemoryRecords = records._records
    read_committed = records._isolation_level == READ_COMMITTED
    check_crcs = records._check_crcs
    start = position = records.next_fetch_offset
    offsets: list[int] = []
    values: list[bytes | None] = []
    add_offset, add_value = offsets.append, values.append
    last_timestamp = -1
    while len(values) < budget and memory.has_next():
        batch = memory.next_batch()
        if check_crcs and not batch.validate_crc():
            raise CorruptRecordException(f"Invalid CRC - {tp}")
        if read_committed and batch.producer_id is not None:
            records._consume_aborted_up_to(batch.base_offset)
            if batch.is_control_batch and records._contains_abort_marker(batch):
                records._aborted_producers.discard(batch.producer_id)
            if batch.is_transactional and batch.producer_id in records._aborted_producers:
                position = batch.next_offset
                continue
        if batch.is_control_batch:
            position = batch.next_offset
            continue
        record = None
        # Legacy (v0/v1) batches have no base offset: their records are filtered one by one.
        if getattr(batch, "base_offset", -1) >= position:
            for record in batch:
                add_value(record.value)
                add_offset(record.offset)
        else:  # e.g. a compressed batch that starts before the offset sought
            for record in batch:
                if record.offset >= position:
                    add_value(record.value)
                    add_offset(record.offset)
        if offsets and record is not None and record.offset == offsets[-1]:
            last_timestamp = record.timestamp
        position = batch.next_offset
    records.next_fetch_offset = position
    result._update_position()
    if not memory.has_next():
        result._partition_records = None
    if not values and position == start:
        return None
    return FetchedRecords(offsets, values, last_timestamp, position)


def _unsupported(consumer: AIOKafkaConsumer) -> str | None:
    """Why the internals `_drain` relies on are not there (None when they all are)."""
    try:
        fetcher = consumer._fetcher
        needed = {
            "consumer": (consumer, ("_closed", "_coordinator", "_subscription", "_fetcher")),
            "fetcher": (
                fetcher,
                (
                    "_records",
                    "_notify",
                    "_wait_consume_future",
                    "_create_fetch_waiter",
                    "_subscriptions",
                    "_closed",
                ),
            ),
        }
        if consumer._key_deserializer is not None or consumer._value_deserializer is not None:
            return "deserializers are set (values must stay bytes)"
        probe = PartitionRecords(
            TopicPartition("probe", 0), MemoryRecords(b""), [], 0, None, None, True, READ_COMMITTED
        )
        needed["PartitionRecords"] = (
            probe,
            (
                "_records",
                "_records_iterator",
                "next_fetch_offset",
                "_check_crcs",
                "_isolation_level",
                "_aborted_producers",
                "_consume_aborted_up_to",
                "_contains_abort_marker",
            ),
        )
        result = FetchResult(
            TopicPartition("probe", 0), assignment=None, partition_records=probe, backoff=0
        )
        needed["FetchResult"] = (
            result,
            ("_partition_records", "check_assignment", "_update_position", "has_more"),
        )
        for name, (thing, attributes) in needed.items():
            missing = [a for a in attributes if not hasattr(thing, a)]
            if missing:
                return f"{name} lacks {missing}"
        if not isinstance(fetcher._records, dict):
            return "Fetcher._records is not a dict"
    except Exception as error:  # noqa: BLE001 - any surprise means: use the public path
        return f"internals differ: {error!r}"
    return None
