"""The exactly-once consume loop shared by the stats and recommender services.

Each Kafka batch is decoded, de-duplicated by event id, handed to the service's `Processor`,
and committed to RocksDB in ONE write batch together with the next offsets of its partitions.
On start (and on every partition assignment) the consumer seeks to the offsets stored in
RocksDB, so whatever point a crash hits, a batch's effect is applied exactly once: either its
write batch landed (state and offsets) or it did not (and the batch is read again).
Kafka's group offsets are committed too, after RocksDB, only so that lag tools can see them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord
from google.protobuf import timestamp_pb2

from viewevents.metrics import DUPLICATES, EVENTS_APPLIED, EVENTS_CONSUMED
from viewevents.state.codecs import BIG_I64, BIG_U32
from viewevents.state.keys import (
    offset_key,
    prefix_end,
    seen_oldest_key,
    seen_prefix,
    watermark_key,
)
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

ViewEvent = view_event_pb2.ViewEvent
VALID_EVENT_TYPES = frozenset(range(1, 5))
SECONDS_PER_DAY = 86_400
MS_PER_DAY = SECONDS_PER_DAY * 1000


class Processor(Protocol):
    """A service's domain logic: fold a partition's new events into its state."""

    def apply(self, partition: int, events: list[ViewEvent], txn: Transaction) -> None:
        """Add the effect of `events` (valid, de-duplicated, in offset order) to `txn`."""

    def committed(self) -> None:
        """Called after each commit (e.g. to refresh caches); may do nothing."""


@dataclass
class ConsumerStats:
    """Counters since start, for logs, metrics and benchmarks."""

    records: int = 0
    applied: int = 0
    duplicates: int = 0
    undecodable: int = 0
    invalid: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)


def _event_seconds(event: ViewEvent) -> int:
    return event.event_time.seconds


def is_applicable(event: ViewEvent) -> bool:
    """The ingest service validated events already; this guards against other producers."""
    return bool(
        event.event_id and event.media_id > 0 and event.user_id > 0
        and event.event_type in VALID_EVENT_TYPES and event.HasField("event_time")
    )


class SeenIds:
    """Bounded, on-disk memory of event ids, per partition.

    An id is a duplicate if it was first seen at most `retention_days` earlier (by Kafka record
    time); a copy re-sent later than that counts again. One key per id. A sweep moves through
    the ids with the stream (`sweep_factor` keys looked at per record, in the same write batch)
    and deletes expired ones; it runs only while the oldest day that may be stored (kept under
    kind `j`, refreshed after each full lap) is older than the retention, so a young store pays
    nothing. The record thus holds at most about `retention_days * (1 + 1/(sweep_factor - 1))`
    days of ids, whatever the stream's length.
    """

    def __init__(self, retention_days: int, sweep_factor: int = 2) -> None:
        if sweep_factor < 2:
            raise ValueError("the sweep must be faster than insertion to ever complete a lap")
        self.retention_days = retention_days
        self.sweep_factor = sweep_factor
        self._cursor: dict[int, bytes] = {}
        self._lap_oldest: dict[int, int] = {}

    def keep_new(
        self, partition: int, events: list[ViewEvent], day: int, txn: Transaction
    ) -> tuple[list[ViewEvent], int]:
        """The events not seen before (first copy wins, offset order kept), and how many were
        duplicates; the new ids are remembered as first seen on `day` (days since 1970)."""
        prefix = seen_prefix(partition)
        first: dict[str, ViewEvent] = {}
        keep_first = first.setdefault
        for event in events:
            keep_first(event.event_id, event)
        ids = list(first)
        keys = [prefix + event_id.encode() for event_id in ids]
        retention = self.retention_days
        fresh: list[ViewEvent] = []
        new_keys: list[bytes] = []
        for event_id, key, seen in zip(ids, keys, txn.get_many(keys)):
            if seen is None or day - BIG_U32.unpack(seen)[0] > retention:
                fresh.append(first[event_id])
                new_keys.append(key)
        if new_keys:
            first_seen = BIG_U32.pack(day)
            txn.put_many((key, first_seen) for key in new_keys)
            oldest_key = seen_oldest_key(partition)
            stored = txn.get(oldest_key)
            if stored is None or BIG_U32.unpack(stored)[0] > day:
                txn.put(oldest_key, first_seen)
            self._lap_oldest[partition] = min(self._lap_oldest.get(partition, day), day)
        return fresh, len(events) - len(fresh)

    def sweep(self, store: StateStore, partition: int, today: int, budget: int, txn: Transaction) -> int:
        """Look at up to `budget` ids after this partition's cursor and delete the expired ones
        (in `txn`, so before `keep_new` of the same batch). Returns how many were deleted."""
        oldest_key = seen_oldest_key(partition)
        stored = txn.get(oldest_key)
        oldest_kept = today - self.retention_days
        if stored is None or BIG_U32.unpack(stored)[0] >= oldest_kept:
            return 0  # nothing stored can have expired yet
        prefix = seen_prefix(partition)
        start = self._cursor.get(partition, prefix)
        lap_oldest = self._lap_oldest.get(partition, today)
        looked = deleted = 0
        last = None
        for key, value in store.scan(start, prefix_end(prefix)):
            last = key
            looked += 1
            day = BIG_U32.unpack(value)[0]
            if day < oldest_kept:
                txn.delete(key)
                deleted += 1
            elif day < lap_oldest:
                lap_oldest = day
            if looked >= budget:
                break
        if last is not None and looked >= budget:
            self._cursor[partition] = last + b"\x00"
            self._lap_oldest[partition] = lap_oldest
        else:
            # A lap (every lap starts at the range's beginning) has looked at every id, and
            # keep_new lowered lap_oldest for ids added behind the cursor: what remains is no
            # older than lap_oldest. Record that, and start the next lap.
            self._cursor[partition] = prefix
            self._lap_oldest[partition] = today
            txn.put(oldest_key, BIG_U32.pack(lap_oldest))
        return deleted


class ExactlyOnceConsumer:
    """Consumes the view-event topic into a `StateStore` through a `Processor`."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        group_id: str,
        store: StateStore,
        processor: Processor,
        batch_max: int = 20_000,
        dedupe_retention_days: int = 30,
        client_id: str = "viewevents-consumer",
        metrics_name: str = "consumer",
    ) -> None:
        self.topic = topic
        self.store = store
        self.processor = processor
        self.batch_max = batch_max
        self.seen = SeenIds(dedupe_retention_days)
        self.stats = ConsumerStats()
        self._consumed = EVENTS_CONSUMED.labels(metrics_name)
        self._applied = EVENTS_APPLIED.labels(metrics_name)
        self._duplicates = DUPLICATES.labels(metrics_name)
        self.positions: dict[int, int] = {}
        self.caught_up = asyncio.Event()
        self._catch_up_targets: dict[int, int] | None = None
        self._stop = asyncio.Event()
        self._consumer_options = dict(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            session_timeout_ms=10_000,  # a killed instance's partitions move on after 10 s
            heartbeat_interval_ms=3_000,
            max_poll_interval_ms=300_000,
        )
        self._consumer: AIOKafkaConsumer | None = None  # made in start(), inside the event loop
        self._apply_lock = asyncio.Lock()

    # --- positions and freshness ----------------------------------------------------------------

    def position(self) -> view_event_pb2.ConsumerPosition:
        """The ConsumerPosition message that query responses carry."""
        parts = sorted(self.positions)
        watermark = self.store.watermark(parts) if parts else None
        return view_event_pb2.ConsumerPosition(
            partitions=[view_event_pb2.PartitionOffset(partition=p, offset=self.positions[p])
                        for p in parts],
            event_time_watermark=(timestamp_pb2.Timestamp(seconds=watermark)
                                  if watermark is not None else None),
            caught_up=self.caught_up.is_set(),
        )

    def lag(self) -> int:
        targets = self._catch_up_targets or {}
        return sum(max(0, end - self.positions.get(p, 0)) for p, end in targets.items())

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**self._consumer_options)
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_SeekToStoredOffsets(self))

    async def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        """Leave the group; call after `run` returned."""
        await self._consumer.stop()

    async def run(self) -> None:
        """Consume until `stop()`; each batch is applied and committed before the next."""
        last_group_commit = time.monotonic()
        while not self._stop.is_set():
            batches = await self._consumer.getmany(timeout_ms=200, max_records=self.batch_max)
            if batches:
                async with self._apply_lock:
                    await asyncio.to_thread(self.apply_batch, batches)
                if time.monotonic() - last_group_commit > 2.0:
                    last_group_commit = time.monotonic()
                    await self._commit_group_offsets()
            await self._check_caught_up()
        await self._commit_group_offsets()

    async def _commit_group_offsets(self) -> None:
        offsets = {TopicPartition(self.topic, p): o for p, o in self.positions.items()}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except Exception as error:  # noqa: BLE001 - informational only; RocksDB has the truth
            log.debug("group offset commit skipped: %r", error)

    async def _check_caught_up(self) -> None:
        try:
            await self._check_caught_up_once()
        except IllegalStateError:
            # A rebalance moved a partition away during the check: start over next round.
            self._catch_up_targets = None

    async def _check_caught_up_once(self) -> None:
        if self.caught_up.is_set():
            return
        assigned = self._consumer.assignment()
        if not assigned:
            return
        if self._catch_up_targets is None:
            ends = await self._consumer.end_offsets(list(assigned))
            self._catch_up_targets = {tp.partition: o for tp, o in ends.items()}
            log.info("catching up to end offsets %s", self._catch_up_targets)
        for tp in assigned:
            if tp.partition not in self.positions:
                self.positions[tp.partition] = await self._consumer.position(tp)
        if all(self.positions.get(p, 0) >= end for p, end in self._catch_up_targets.items()):
            elapsed = time.monotonic() - self.stats.started
            log.info("caught up: %d records applied in %.1f s", self.stats.applied, elapsed)
            self.caught_up.set()

    def apply_batch(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Decode, de-duplicate, process and commit one Kafka batch. `run` calls it in a worker
        thread for every fetch; in-process drivers (offline evaluation, tests) call it directly."""
        txn = Transaction(self.store)
        applied_before = self.stats.applied
        new_positions: dict[int, int] = {}
        for tp, records in batches.items():
            if not records:
                continue
            partition = tp.partition
            events = self._decode(records)
            # A batch spans seconds, so its last record time stands for all of them in the
            # day-granular de-duplication memory.
            day = records[-1].timestamp // MS_PER_DAY
            self.seen.sweep(self.store, partition, day, self.seen.sweep_factor * len(records), txn)
            fresh, duplicates = self.seen.keep_new(partition, events, day, txn)
            if fresh:
                self.processor.apply(partition, fresh, txn)
                self._raise_watermark(partition, max(map(_event_seconds, fresh)), txn)
            next_offset = records[-1].offset + 1
            txn.put(offset_key(partition, self.topic), BIG_I64.pack(next_offset))
            new_positions[partition] = next_offset
            self.stats.records += len(records)
            self.stats.applied += len(fresh)
            self.stats.duplicates += duplicates
            self._duplicates.inc(duplicates)
        txn.commit()
        self.positions.update(new_positions)
        self.stats.batches += 1
        self._consumed.inc(sum(len(r) for r in batches.values()))
        self._applied.inc(self.stats.applied - applied_before)
        self.processor.committed()

    def _decode(self, records: list[ConsumerRecord]) -> list[ViewEvent]:
        """The records that are applicable ViewEvents, in offset order (the hot loop)."""
        parse = ViewEvent.FromString
        events: list[ViewEvent] = []
        append = events.append
        for record in records:
            try:
                append(parse(record.value))
            except Exception:  # noqa: BLE001 - a foreign record must not stop the consumer
                self.stats.undecodable += 1
        applicable = [e for e in events if is_applicable(e)]
        self.stats.invalid += len(events) - len(applicable)
        return applicable

    @staticmethod
    def _raise_watermark(partition: int, event_time: int, txn: Transaction) -> None:
        if not event_time:
            return
        key = watermark_key(partition)
        current = txn.get(key)
        if current is None or BIG_I64.unpack(current)[0] < event_time:
            txn.put(key, BIG_I64.pack(event_time))


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    """On assignment, continue from the offsets committed to RocksDB, not Kafka's."""

    def __init__(self, owner: ExactlyOnceConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.owner._apply_lock:  # no batch is half-applied while partitions move
            for tp in revoked:
                self.owner.positions.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        owner = self.owner
        stored = owner.store.stored_offsets(owner.topic, [tp.partition for tp in assigned])
        for tp in assigned:
            if tp.partition in stored:
                owner._consumer.seek(tp, stored[tp.partition])
                owner.positions[tp.partition] = stored[tp.partition]
            else:
                await owner._consumer.seek_to_beginning(tp)
        owner._catch_up_targets = None
        log.info("assigned partitions %s; resuming from stored offsets %s",
                 sorted(tp.partition for tp in assigned), stored)
