"""The exactly-once consume loop shared by the stats and recommender services.

Each Kafka batch is decoded, de-duplicated by event id, handed to the service's `Processor`,
and committed to RocksDB in ONE write batch together with the next offsets of its partitions.
On start (and on every partition assignment) the consumer seeks to the offsets stored in
RocksDB, so whatever point a crash hits, a batch's effect is applied exactly once: either its
write batch landed (state and offsets) or it did not (and the batch is read again).
Kafka's group offsets are committed too, after RocksDB, only so that lag tools (and ingest's
bounded staleness) can see them, at most every VIEWEVENTS_GROUP_COMMIT_INTERVAL_MS; that
commit, and leaving the group on close, are bounded in time: RocksDB holds the truth.

An instance answers only for the partitions it owns and says it is caught up only once each of
them reached the end offset seen after the latest assignment (`CatchUp`); its readiness (what
grpc.health.v1 says) also needs Kafka to be reachable (`viewevents.readiness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_not
from typing import Protocol

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import IllegalStateError
from aiokafka.structs import ConsumerRecord
from google.protobuf import timestamp_pb2

from viewevents.kafka import probe_metadata
from viewevents.kafka_fetch import BulkFetch, FetchedRecords
from viewevents.membership import Claim, OwnershipAssignor
from viewevents.metrics import (
    DUPLICATES,
    EVENTS_APPLIED,
    EVENTS_CONSUMED,
    PARTITION_OWNER,
    WRITE_STALL_SECONDS,
)
from viewevents.readiness import PROBE_TIMEOUT_S, Readiness, watch_kafka
from viewevents.state.absence import AbsenceFilter, filter_bytes, key_hashes
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
from viewevents.wire import decode_view_events, unscanned

log = logging.getLogger(__name__)

ViewEvent = view_event_pb2.ViewEvent
VALID_EVENT_TYPES = frozenset(range(1, 5))
SECONDS_PER_DAY = 86_400
MS_PER_DAY = SECONDS_PER_DAY * 1000
KAFKA_CALL_TIMEOUT_S = PROBE_TIMEOUT_S  # a Kafka call inside the loop never blocks it longer
# A linger must be expected to bring at least this many records, else it would only add latency
# (an idle probe event, a trickle): at 30 ms that means a stream of over 3,300 events/s.
LINGER_MIN_GAIN = 100
# The fewest records a byte-bounded batch is cut to (`batch_limit`): below that the per-batch
# costs (a write batch with its WAL write, a multi-get per key kind) dominate.
BATCH_BYTES_MIN_RECORDS = 500
# Fewer records than this are decoded by protobuf one at a time instead of by the columnar scan
# (viewevents.wire), whose fixed cost (about 0.6 ms) a handful of records does not repay. In
# process: 1 record 0.69 ms scanned / 0.03 ms by protobuf, 128 records 0.70 / 0.30, 400 records
# 0.97 / 0.86.
SCAN_MIN_RECORDS = 128


def linger_seconds(fetched: int, since_last_s: float, batch_min: int, linger_s: float) -> float:
    """How long to wait for more records after a fetch of `fetched` records that came
    `since_last_s` after the previous fetch returned. Tailing a busy stream, each fetch holds
    only what arrived during one round trip, and every batch pays fixed costs (a RocksDB write
    batch with its WAL write, a multi-get per key kind, numpy set-up per call): a short wait
    shares them among more events. It waits only when the batch is short of `batch_min` and
    the arrival rate says the wait would bring at least `LINGER_MIN_GAIN` more records, so a
    lone event (idle freshness) is applied at once."""
    if linger_s <= 0 or fetched <= 0 or fetched >= batch_min:
        return 0.0
    rate = fetched / max(since_last_s, 1e-3)
    return linger_s if rate * linger_s >= LINGER_MIN_GAIN else 0.0


def batch_limit(records: int, written: int, budget: int, batch_max: int) -> int:
    """Records the next batch may take so that its RocksDB write batch stays near `budget`
    bytes, scaled from the last batch (`records` records wrote `written` bytes). Why: what one
    batch writes per record is not fixed; the recommender's grows with its state (neighbour rows
    grow denser, compactions rewrite larger rows), and while the consumer is behind every batch
    is a full `batch_max`, so the batch in flight (its writes, the write batch, its numpy
    temporaries) grew with the state. A batch with fixed costs above the budget converges to
    `BATCH_BYTES_MIN_RECORDS`. `budget` 0 turns the bound off (always `batch_max`)."""
    if budget <= 0 or records <= 0 or written <= 0:
        return batch_max
    return max(min(BATCH_BYTES_MIN_RECORDS, batch_max), min(batch_max, budget * records // written))


def join_fetches(
    batches: dict[TopicPartition, FetchedRecords], later: Mapping[TopicPartition, FetchedRecords]
) -> None:
    """Add a later fetch to `batches`, partition by partition, in offset order. A partition
    whose later records do not continue the earlier ones was sought back in between (its
    assignment moved and it resumed from the stored offset, so the earlier records will be
    read again): only the later records are kept for it."""
    for tp, records in later.items():
        earlier = batches.get(tp)
        if earlier is None:
            batches[tp] = records
            continue
        try:
            earlier.extend(records)
        except ValueError:
            batches[tp] = records


class Processor(Protocol):
    """A service's domain logic: fold a partition's new events into its state.

    A processor may also offer `apply_decoded(partition, batch: EventBatch, txn)`, which the
    consumer then calls instead of `apply`: the same events as arrays, no message objects.
    """

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


@dataclass
class EventBatch:
    """Decoded events of one partition batch as parallel columns, in offset order, with the
    records' serialized values (to build messages for processors that want them)."""

    event_id: list[bytes]
    media_id: np.ndarray
    user_id: np.ndarray
    event_type: np.ndarray
    seconds: np.ndarray
    values: list[bytes]

    def __len__(self) -> int:
        return len(self.event_id)

    def take(self, rows: Sequence[int] | np.ndarray) -> EventBatch:
        index = np.asarray(rows, np.int64)
        listed = index.tolist()
        # map(list.__getitem__): the rows are picked in C, not in a Python loop per event.
        return EventBatch(
            list(map(self.event_id.__getitem__, listed)),
            self.media_id[index],
            self.user_id[index],
            self.event_type[index],
            self.seconds[index],
            list(map(self.values.__getitem__, listed)),
        )

    def messages(self) -> list[ViewEvent]:
        return list(map(ViewEvent.FromString, self.values))


def is_applicable(event: ViewEvent) -> bool:
    """The ingest service validated events already; this guards against other producers."""
    return bool(
        event.event_id
        and event.media_id > 0
        and event.user_id > 0
        and event.event_type in VALID_EVENT_TYPES
        and event.HasField("event_time")
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

    def __init__(
        self,
        retention_days: int,
        sweep_factor: int = 2,
        filter_capacity: int = 0,
        filter_budget_bytes: int | None = None,
    ) -> None:
        if sweep_factor < 2:
            raise ValueError("the sweep must be faster than insertion to ever complete a lap")
        self.retention_days = retention_days
        self.sweep_factor = sweep_factor
        self._cursor: dict[int, bytes] = {}
        self._lap_oldest: dict[int, int] = {}
        # Per partition, an AbsenceFilter holding every id key stored for it (and ids deleted
        # since, harmlessly): ids it never saw skip the read. None: off for that partition.
        self.filter_capacity = filter_capacity
        # All partitions' filters together stay within this (None: no limit); a partition whose
        # filter would not fit goes without one (its reads are not skipped).
        self.filter_budget_bytes = filter_budget_bytes
        self._filters: dict[int, AbsenceFilter | None] = {}
        self.reads_skipped = 0

    def _filter(self, partition: int, store: StateStore) -> AbsenceFilter | None:
        """The partition's filter, built from the store's ids on first use and rebuilt when
        full (the sweep has deleted expired ids by then); off when the store holds more than
        half its capacity (the retention keeps more ids than it is sized for)."""
        if not self.filter_capacity:
            return None
        if partition in self._filters:
            current = self._filters[partition]
            if current is None or not current.full:
                return current
        if not self._fits(partition):
            self._filters[partition] = None
            return None
        prefix = seen_prefix(partition)
        limit = self.filter_capacity // 2
        keys: list[bytes] = []
        for key, _ in store.scan_prefix(prefix):
            keys.append(key)
            if len(keys) > limit:
                log.info(
                    "partition %d keeps over %d event ids: reads of new ids are not skipped "
                    "(VIEWEVENTS_DEDUPE_FILTER_IDS=%d)",
                    partition,
                    limit,
                    self.filter_capacity,
                )
                self._filters[partition] = None
                return None
        built = AbsenceFilter(self.filter_capacity)
        built.add(key_hashes(keys))
        self._filters[partition] = built
        return built

    def _fits(self, partition: int) -> bool:
        """Whether a filter for `partition` fits the budget beside the other partitions'."""
        if self.filter_budget_bytes is None:
            return True
        others = sum(f.nbytes for p, f in self._filters.items() if f is not None and p != partition)
        if others + filter_bytes(self.filter_capacity) <= self.filter_budget_bytes:
            return True
        log.info(
            "partition %d goes without a de-duplication filter: %d partitions' filters already "
            "hold %.1f of the %.1f MiB budget share (reads of its new ids are not skipped)",
            partition,
            sum(f is not None for f in self._filters.values()),
            others / 2**20,
            self.filter_budget_bytes / 2**20,
        )
        return False

    def retain(self, partitions: Iterable[int]) -> None:
        """Keep only the filters of `partitions` (the new assignment): filters of every
        partition ever owned do not pile up, and the ones kept across a rebalance (which
        revokes everything first) are not rebuilt. One that comes back is built from the store."""
        keep = set(partitions)
        for partition in [p for p in self._filters if p not in keep]:
            del self._filters[partition]

    def keep_new(
        self, partition: int, events: list[ViewEvent], day: int, txn: Transaction
    ) -> tuple[list[ViewEvent], int]:
        """The events not seen before (first copy wins, offset order kept), and how many were
        duplicates; the new ids are remembered as first seen on `day` (days since 1970)."""
        rows = self.keep_new_ids(partition, [e.event_id.encode() for e in events], day, txn)
        return [events[i] for i in rows], len(events) - len(rows)

    def keep_new_ids(
        self, partition: int, ids: list[bytes], day: int, txn: Transaction
    ) -> list[int]:
        """`keep_new` on the events' ids (UTF-8): the rows to keep, in offset order."""
        prefix = seen_prefix(partition)
        # The first row of each id, in offset order. Ids are one per event, so the usual case
        # (no id twice in the batch) is built in C, without a Python loop over them.
        count = len(ids)
        unique = dict.fromkeys(ids)
        if len(unique) == count:
            rows: list[int] = list(range(count))
            keys = list(map(prefix.__add__, ids))
        else:
            # Fed backwards, a dict keeps each id's first row; a mask puts them in offset order.
            first_rows = dict(zip(reversed(ids), range(count - 1, -1, -1))).values()
            mask = np.zeros(count, bool)
            mask[np.fromiter(first_rows, np.int64, len(unique))] = True
            rows = np.flatnonzero(mask).tolist()
            keys = list(map(prefix.__add__, map(ids.__getitem__, rows)))
        absence = self._filter(partition, txn.store)
        if absence is None:
            seen_days = txn.get_many(keys)
        else:
            hashes = key_hashes(keys)
            maybe = np.flatnonzero(absence.may_contain(hashes))
            seen_days = [None] * len(keys)
            if len(maybe):
                listed = maybe.tolist()
                for index, value in zip(listed, txn.get_many(list(map(keys.__getitem__, listed)))):
                    seen_days[index] = value
            self.reads_skipped += len(keys) - len(maybe)
        known = np.flatnonzero(np.fromiter(map(is_not, seen_days, repeat(None)), bool, len(keys)))
        if len(known) == 0:
            fresh, new_keys = rows, keys
        else:  # a few duplicates: only their stored days are looked at one by one
            retention = self.retention_days
            new = np.ones(len(keys), bool)
            for index in known.tolist():
                seen = seen_days[index]
                assert seen is not None
                new[index] = day - BIG_U32.unpack(seen)[0] > retention
            fresh = list(compress(rows, new.tolist()))
            new_keys = list(compress(keys, new.tolist()))
        if new_keys:
            first_seen = BIG_U32.pack(day)
            txn.put_many(dict.fromkeys(new_keys, first_seen))
            if absence is not None:
                # Before the commit: a filter may hold more than the store, never less.
                absence.add(hashes if len(new_keys) == len(keys) else key_hashes(new_keys))
            oldest_key = seen_oldest_key(partition)
            stored = txn.get(oldest_key)
            if stored is None or BIG_U32.unpack(stored)[0] > day:
                txn.put(oldest_key, first_seen)
            self._lap_oldest[partition] = min(self._lap_oldest.get(partition, day), day)
        return fresh

    def sweep(
        self, store: StateStore, partition: int, today: int, budget: int, txn: Transaction
    ) -> int:
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


class CatchUp:
    """Which partitions this instance answers for, and whether it caught up on all of them.

    Pure bookkeeping that the consumer drives. Every assignment or revocation starts over for
    the partitions it brings: newly assigned ones may be far behind in this instance's store,
    and the answer must not count partitions it no longer owns. A partition is caught up when its position is at or
    past the end offset read after the latest assignment, or when it was caught up here before
    a rebalance and this instance owned it without a break (its Kafka group generations are
    consecutive, so no other member can have read it meanwhile): such a kept partition keeps
    answering through a rebalance during a large upload instead of waiting out its backlog.
    An instance the group dropped and took back (missed heartbeats: generations not
    consecutive) keeps a partition it was caught up on the same way when no other member moved
    it on meanwhile: no store of the members that joined the new generation is further along in
    it (their claims, which they send after their partitions were revoked) and the group's
    committed offset is not past this store's (what members that left had committed; they
    commit every VIEWEVENTS_GROUP_COMMIT_INTERVAL_MS and at each revocation). So its store is
    as fresh as when it last answered.
    Caught up overall means at least one partition owned and every owned one caught up.
    """

    def __init__(self) -> None:
        self.assigned: frozenset[int] = frozenset()
        self.positions: dict[int, int] = {}  # next offset to read, owned partitions only
        self.targets: dict[int, int] | None = None  # end offsets seen after the assignment
        self.generation = 0  # changes at every assignment/revocation; stale targets are dropped
        # Owned partitions caught up under an earlier assignment and owned without a break since.
        self.settled: frozenset[int] = frozenset()
        # At a revocation: the group generation it ended and the partitions caught up then.
        self._held: tuple[int, frozenset[int]] | None = None
        self._assigned_in: int | None = None  # the group generation of the latest assignment

    def revoke(self, partitions: Iterable[int], group_generation: int | None = None) -> None:
        """Partitions taken away at the end of Kafka group generation `group_generation`
        (None or -1 when unknown or reset: the generation of the latest assignment stands)."""
        caught_up_before = self.caught_up_partitions()
        gone = set(partitions)
        self.assigned = self.assigned - gone
        for partition in gone:
            self.positions.pop(partition, None)
        # aiokafka resets its generation before this call when the group dropped the member
        # (missed heartbeats): the generation of the assignment being revoked stands then.
        ended = group_generation if group_generation and group_generation > 0 else self._assigned_in
        self._held = (ended, caught_up_before) if ended else None
        self.settled = frozenset()
        self._restart()

    def taken_back(self, partitions: Iterable[int], group_generation: int | None) -> list[int]:
        """Of a new assignment, the partitions this instance was caught up on before a break in
        its group generations: `assign` keeps those whose group offset it is given and finds
        not past the store's."""
        if self._held is None or group_generation is None or group_generation == self._held[0] + 1:
            return []
        return sorted(self._held[1] & set(partitions))

    def assign(
        self,
        partitions: Iterable[int],
        stored: Mapping[int, int],
        group_generation: int | None = None,
        committed: Mapping[int, int | None] | None = None,
        furthest: Mapping[int, int] | None = None,
    ) -> None:
        """The group's new assignment (all owned partitions), their offsets in the store, the
        Kafka group generation it belongs to (None when unknown), and for the partitions
        `taken_back` named: the group's committed offsets (a partition missing, or None: never
        committed, is not kept) and the furthest any joining member's store is in each."""
        self.assigned = frozenset(partitions)
        kept = {p: o for p, o in self.positions.items() if p in self.assigned}
        self.positions.clear()
        self.positions.update(kept)
        self.positions.update({p: o for p, o in stored.items() if p in self.assigned})
        held, self._held = self._held, None
        self._assigned_in = group_generation if group_generation and group_generation > 0 else None
        if held is not None and group_generation is not None and group_generation == held[0] + 1:
            self.settled = held[1] & self.assigned
        elif held is not None and committed:
            ahead = furthest or {}
            self.settled = frozenset(
                p
                for p in held[1] & self.assigned
                if p in stored
                and (done := committed.get(p)) is not None
                and done <= stored[p]
                and ahead.get(p, -1) <= stored[p]
            )
        else:
            self.settled = frozenset()
        self._restart()

    def _restart(self) -> None:
        self.targets = None
        self.generation += 1

    def missing_positions(self) -> list[int]:
        return sorted(self.assigned - self.positions.keys())

    def set_targets(self, generation: int, ends: Mapping[int, int]) -> bool:
        """Record end offsets read during `generation`; refused when the assignment changed
        since, or when they do not cover exactly the owned partitions."""
        if generation != self.generation or not self.assigned or set(ends) != self.assigned:
            return False
        self.targets = dict(ends)
        return True

    def advance(self, positions: Mapping[int, int]) -> None:
        """Positions after a committed batch (only owned partitions are given)."""
        self.positions.update(positions)

    def caught_up_partitions(self) -> frozenset[int]:
        """Owned partitions at or past their end offset read after the latest assignment, or
        kept without a break since they were caught up: the only ones this instance may answer
        from (the others are still being replayed)."""
        targets = self.targets or {}
        return frozenset(
            p
            for p in self.assigned
            if p in self.settled or (p in targets and self.positions.get(p, -1) >= targets[p])
        )

    @property
    def caught_up(self) -> bool:
        return bool(self.assigned) and self.caught_up_partitions() == self.assigned

    def lag(self) -> int:
        targets = self.targets or {}
        return sum(max(0, end - self.positions.get(p, 0)) for p, end in targets.items())


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
        batch_min: int = 5_000,
        batch_bytes: int = 0,
        linger_ms: int = 30,
        dedupe_retention_days: int = 30,
        dedupe_filter_ids: int = 1_000_000,
        dedupe_filter_bytes: int | None = None,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 250,
        client_id: str = "viewevents-consumer",
        metrics_name: str = "consumer",
        advertised_address: str = "",
        fetch_max_bytes: int = 64 * 1024 * 1024,
        max_partition_fetch_bytes: int = 8 * 1024 * 1024,
        group_commit_interval_ms: int = 250,
    ) -> None:
        self.topic = topic
        self.address = advertised_address  # where other instances reach this one's queries
        self.metrics_name = metrics_name
        # partition -> query address of its owner, from the group's latest assignment.
        self.owners: dict[int, str] = {}
        self.store = store
        self.processor = processor
        self.batch_max = batch_max
        self.batch_min = min(batch_min, batch_max)  # a larger minimum could never be met
        self.batch_bytes = batch_bytes  # about what one batch may write (0: no byte bound)
        self.batch_limit = batch_max  # records the next batch may take (`batch_limit`)
        self.linger_s = linger_ms / 1000
        self.group_commit_s = group_commit_interval_ms / 1000
        self._group_committed: dict[int, int] = {}  # positions as last committed to Kafka
        self.seen = SeenIds(
            dedupe_retention_days,
            filter_capacity=dedupe_filter_ids,
            filter_budget_bytes=dedupe_filter_bytes,
        )
        self.stats = ConsumerStats()
        self._consumed = EVENTS_CONSUMED.labels(metrics_name)
        self._applied = EVENTS_APPLIED.labels(metrics_name)
        self._duplicates = DUPLICATES.labels(metrics_name)
        self._write_stalls = WRITE_STALL_SECONDS.labels(metrics_name)
        self.catch_up = CatchUp()
        self.positions = self.catch_up.positions  # one dict: what `position()` reports
        # Mirrors `catch_up.caught_up` for code that waits on it (e.g. the recommender warmer).
        self.caught_up = asyncio.Event()
        self.kafka_reachable = True
        # What health says: caught up on every owned partition and Kafka reachable.
        self.readiness = Readiness()
        self._stop = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._assignor = OwnershipAssignor(self._claim, self._owners_changed)
        self._consumer_options = dict(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Sized by the service's memory budget (viewevents.memory): what one fetch holds.
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            fetch_max_bytes=fetch_max_bytes,
            # A killed instance's partitions move on after the session timeout; a rebalance
            # waits until every member's next heartbeat has told it of the rebalance.
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1, min(heartbeat_interval_ms, session_timeout_ms // 3)),
            max_poll_interval_ms=300_000,
            # Claims (address, stored offsets) in, a state-aware plan and the owners map out.
            partition_assignment_strategy=(self._assignor,),
        )
        self._consumer: AIOKafkaConsumer | None = None  # made in start(), inside the event loop
        self._fetch: BulkFetch | None = None  # reads self._consumer's fetched batches in bulk
        self._apply_lock = asyncio.Lock()

    # --- positions and freshness ----------------------------------------------------------------

    @property
    def _kafka(self) -> AIOKafkaConsumer:
        """The Kafka consumer, made in start()."""
        assert self._consumer is not None, "start() first"
        return self._consumer

    def position(self) -> view_event_pb2.ConsumerPosition:
        """The ConsumerPosition message that query responses carry."""
        parts = sorted(self.positions)
        watermark = self.store.watermark(parts) if parts else None
        return view_event_pb2.ConsumerPosition(
            partitions=[
                view_event_pb2.PartitionOffset(partition=p, offset=self.positions[p]) for p in parts
            ],
            event_time_watermark=(
                timestamp_pb2.Timestamp(seconds=watermark) if watermark is not None else None
            ),
            caught_up=self.catch_up.caught_up,
        )

    def lag(self) -> int:
        return self.catch_up.lag()

    # --- ownership (viewevents.membership) -----------------------------------------------------

    def _claim(self) -> Claim:
        """What this member tells the group leader at every join: its address, and how far
        its store is in each partition (so partitions go back to the state that holds them)."""
        known = self._consumer.partitions_for_topic(self.topic) if self._consumer else None
        partitions = set(known or ()) | set(self.catch_up.assigned)
        return Claim(self.address, self.store.stored_offsets(self.topic, sorted(partitions)))

    def _owners_changed(self, owners: dict[int, str]) -> None:
        """The partition -> address map that came with this member's assignment."""
        if owners == self.owners:
            return
        for partition, address in self.owners.items():
            if owners.get(partition) != address:
                try:
                    PARTITION_OWNER.remove(self.metrics_name, str(partition), address)
                except KeyError:
                    pass
        for partition, address in owners.items():
            PARTITION_OWNER.labels(self.metrics_name, str(partition), address).set(1)
        moved = {
            p: f"{self.owners.get(p, '-')} -> {a}"
            for p, a in sorted(owners.items())
            if self.owners.get(p) != a
        }
        log.info(
            "partition owners (I am %s): %s; changed: %s",
            self.address or "?",
            dict(sorted(owners.items())),
            moved,
        )
        self.owners = owners

    def answerable(self) -> frozenset[int]:
        """Partitions this instance may answer from now: owned and caught up."""
        return self.catch_up.caught_up_partitions()

    def owns_all(self) -> bool:
        """This instance owns every partition of the topic (as far as the group said)."""
        return bool(self.owners) and set(self.owners) <= self.catch_up.assigned

    def _kafka_probe(self, consumer: AIOKafkaConsumer) -> Callable[[], Awaitable[object]]:
        """A metadata request for our topic only (`probe_metadata`), through the consumer's own
        client, which aiokafka does not expose publicly: if that ever goes, the whole
        cluster's metadata (`topics()`), which is slower but the same answer to "is Kafka up"."""
        client = getattr(consumer, "_client", None)
        if not isinstance(client, AIOKafkaClient):
            return consumer.topics
        return lambda: probe_metadata(client, [self.topic])

    def _group_generation(self) -> int | None:
        """The Kafka group generation the consumer is in (aiokafka's coordinator), or None when
        it cannot be read (at a revocation the latest assignment's generation then stands)."""
        generation = getattr(getattr(self._consumer, "_coordinator", None), "generation", None)
        return generation if isinstance(generation, int) else None

    def _publish(self) -> None:
        """Bring `caught_up` and `readiness` in line with the bookkeeping (after each change)."""
        caught_up = self.catch_up.caught_up
        if caught_up and not self.caught_up.is_set():
            elapsed = time.monotonic() - self.stats.started
            log.info(
                "caught up on partitions %s: %d records applied in %.1f s since start"
                " (%d write batches, %d records fetched)",
                sorted(self.catch_up.assigned),
                self.stats.applied,
                elapsed,
                self.stats.batches,
                self.stats.records,
            )
            self.caught_up.set()
        elif not caught_up and self.caught_up.is_set():
            self.caught_up.clear()
        if not self.kafka_reachable:
            self.readiness.set(False, "Kafka unreachable")
        elif not caught_up:
            self.readiness.set(
                False, "catching up" if self.catch_up.assigned else "no partition assigned"
            )
        else:
            self.readiness.set(True, "caught up")

    def _kafka_changed(self, reachable: bool) -> None:
        self.kafka_reachable = reachable
        self._publish()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and subscribe; a failed attempt leaves nothing open, so it can be retried
        (viewevents.readiness.until_kafka_answers)."""
        consumer = AIOKafkaConsumer(**self._consumer_options)
        try:
            await consumer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), KAFKA_CALL_TIMEOUT_S)
            raise
        self._consumer = consumer
        self._fetch = BulkFetch(self._consumer)
        self._consumer.subscribe([self.topic], listener=_SeekToStoredOffsets(self))
        self._watch = asyncio.create_task(
            watch_kafka(self._kafka_probe(consumer), self._kafka_changed), name="kafka-watch"
        )

    async def stop(self) -> None:
        self._stop.set()

    async def close(self, timeout: float = KAFKA_CALL_TIMEOUT_S) -> None:
        """Leave the group, within `timeout` seconds; call after `run` returned. When Kafka does
        not answer in time, the group hands the partitions on after the session timeout."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        try:
            await asyncio.wait_for(self._kafka.stop(), timeout)
        except TimeoutError:
            log.warning(
                "could not leave the consumer group within %.0f s (Kafka unreachable?); "
                "its partitions move on after the session timeout",
                timeout,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this shutdown itself is being cancelled
            # aiokafka 0.14's fetcher re-raises the cancellation of its own fetch task when it
            # was in retry back-off (Kafka unreachable); nothing is left to clean up but sockets.
            log.warning("Kafka consumer stopped with its fetcher interrupted (Kafka unreachable)")

    async def run(self) -> None:
        """Consume until `stop()`; each batch is applied and committed before the next. Every
        Kafka call here is bounded, so `stop()` takes effect within seconds whatever Kafka does."""
        last_group_commit = last_fetch = time.monotonic()
        while not self._stop.is_set():
            assert self._fetch is not None, "start() first"
            batches = await self._fetch.getmany(timeout_ms=200, max_records=self.batch_limit)
            # The assignment the records were drained under (nothing can yield since the drain);
            # a rebalance during the linger below ends it, and the batch is then read again.
            drained_in = self.catch_up.generation
            now = time.monotonic()
            if batches:
                batches = await self._linger(batches, now - last_fetch)
            last_fetch = now
            if batches:
                async with self._apply_lock:
                    if drained_in != self.catch_up.generation:
                        await self._rewind(batches)
                    else:
                        # Only partitions owned now: a batch fetched before a revocation must
                        # not move positions (or state) of a partition another member reads now.
                        owned = {
                            tp: records
                            for tp, records in batches.items()
                            if tp.partition in self.catch_up.assigned
                        }
                        if owned:
                            await self._apply_in_thread(owned)
            if (
                time.monotonic() - last_group_commit >= self.group_commit_s
                and self.positions != self._group_committed
            ):
                last_group_commit = time.monotonic()
                await self._commit_group_offsets()
            await self._check_caught_up()
        await self._commit_group_offsets(timeout=1.0)  # on the way out: do not wait long

    async def _rewind(self, batches: Mapping[TopicPartition, FetchedRecords]) -> None:
        """Drop records drained before the latest rebalance and read the partitions still owned
        again from the store's offsets. aiokafka starts a new assignment at Kafka's group offset
        and may hand out records from there before the rebalance listener has seeked to the
        store's offset; applied, such records would move a partition's stored offset past records
        never applied (a new owner's store is behind the old owner's group offset), and answers
        would claim that offset while missing them. Call with `_apply_lock` held."""
        owned = [tp for tp in batches if tp.partition in self.catch_up.assigned]
        log.info(
            "dropped records drained before the latest rebalance (partitions %s); reading "
            "partitions %s again from their stored offsets",
            sorted(tp.partition for tp in batches),
            sorted(tp.partition for tp in owned),
        )
        if not owned:
            return
        try:
            await asyncio.wait_for(self._seek_to_stored(owned), KAFKA_CALL_TIMEOUT_S)
        except (IllegalStateError, TimeoutError) as error:
            # Moved on again (the next assignment seeks anew) or Kafka is slow to tell where
            # the beginning is (the reset stays requested; the fetcher completes it).
            log.debug("re-seek after a rebalance cut short: %r", error)

    async def _seek_to_stored(self, partitions: Sequence[TopicPartition]) -> dict[int, int]:
        """Point Kafka's positions of `partitions` at the next offsets the store holds for them
        (their beginning where it holds none); the stored offsets. Every seek and reset is
        requested before the first await (the old listener awaited one reset per partition, and
        the loop drained the partitions not yet seeked meanwhile). Call with `_apply_lock` held."""
        stored = self.store.stored_offsets(self.topic, [tp.partition for tp in partitions])
        for tp in partitions:
            if tp.partition in stored:
                self._kafka.seek(tp, stored[tp.partition])
        fresh = [tp for tp in partitions if tp.partition not in stored]
        if fresh:
            await self._kafka.seek_to_beginning(*fresh)
        return stored

    async def _linger(
        self, batches: dict[TopicPartition, FetchedRecords], since_last_s: float
    ) -> dict[TopicPartition, FetchedRecords]:
        """More records joined to `batches` while a stream flows in (`linger_seconds`), until
        `batch_min` records or the linger time; a rebalance meanwhile ends the wait."""
        assert self._fetch is not None
        count = sum(map(len, batches.values()))
        limit = self.batch_limit
        batch_min = min(self.batch_min, limit)
        wait = linger_seconds(count, since_last_s, batch_min, self.linger_s)
        if not wait:
            return batches
        generation = self.catch_up.generation
        deadline = time.monotonic() + wait
        while count < batch_min and generation == self.catch_up.generation:
            left_ms = int(1000 * (deadline - time.monotonic()))
            if left_ms <= 0:
                break
            later = await self._fetch.getmany(timeout_ms=left_ms, max_records=max(1, limit - count))
            if not later:
                break
            join_fetches(batches, later)
            count = sum(map(len, batches.values()))
        return batches

    async def _apply_in_thread(self, batches: dict[TopicPartition, FetchedRecords]) -> None:
        """`apply_fetched` in a worker thread. Cancelling the caller does not cut the batch short:
        it waits for the thread, so the store is never closed under a write in progress."""
        job = asyncio.ensure_future(asyncio.to_thread(self.apply_fetched, batches))
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            while not job.done():
                try:
                    await asyncio.shield(job)
                except asyncio.CancelledError:
                    continue
            raise

    async def _group_offsets(self, partitions: Sequence[int]) -> dict[int, int | None]:
        """The group's committed offsets of `partitions` (None: never committed); empty when
        Kafka does not tell in time (then none of them is kept through the rebalance)."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        try:
            found = await asyncio.wait_for(
                asyncio.gather(*(self._kafka.committed(tp) for tp in tps), return_exceptions=True),
                KAFKA_CALL_TIMEOUT_S,
            )
        except TimeoutError:
            found = []
        offsets = {
            p: o for p, o in zip(partitions, found) if o is None or isinstance(o, int)
        }  # a partition Kafka did not tell about is not kept (the strict path: catch up first)
        if len(offsets) < len(partitions):
            log.info("group offsets of partitions %s not read in time", partitions)
        return offsets

    async def _commit_group_offsets(self, timeout: float = KAFKA_CALL_TIMEOUT_S) -> None:
        offsets = {TopicPartition(self.topic, p): o for p, o in self.positions.items()}
        if not offsets:
            return
        try:
            await asyncio.wait_for(self._kafka.commit(offsets), timeout)
        except Exception as error:  # noqa: BLE001 - informational only; RocksDB has the truth
            log.debug("group offset commit skipped: %r", error)
        else:
            self._group_committed = {tp.partition: o for tp, o in offsets.items()}

    async def _check_caught_up(self) -> None:
        try:
            await self._check_caught_up_once()
        except (IllegalStateError, TimeoutError) as error:
            # A rebalance moved a partition away during the check, or Kafka is slow: the next
            # round starts over (a generation change makes stale end offsets be refused).
            log.debug("catch-up check postponed: %r", error)
        self._publish()

    async def _check_caught_up_once(self) -> None:
        catch_up = self.catch_up
        if not catch_up.assigned or (catch_up.caught_up and catch_up.targets is not None):
            return
        generation = catch_up.generation
        tps = [TopicPartition(self.topic, p) for p in sorted(catch_up.assigned)]
        if catch_up.targets is None:
            ends = await asyncio.wait_for(self._kafka.end_offsets(tps), KAFKA_CALL_TIMEOUT_S)
            if catch_up.set_targets(generation, {tp.partition: o for tp, o in ends.items()}):
                log.info("catching up to end offsets %s", catch_up.targets)
        for partition in catch_up.missing_positions():
            tp = TopicPartition(self.topic, partition)
            offset = await asyncio.wait_for(self._kafka.position(tp), KAFKA_CALL_TIMEOUT_S)
            if generation == catch_up.generation and partition not in catch_up.positions:
                catch_up.positions[partition] = offset

    def apply_batch(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """`apply_fetched` for records as the public getmany returns them (in-process drivers
        such as the offline evaluation and tests build those)."""
        self.apply_fetched(
            {
                tp: FetchedRecords.from_consumer_records(records)
                for tp, records in batches.items()
                if records
            }
        )

    def apply_fetched(self, batches: Mapping[TopicPartition, FetchedRecords]) -> None:
        """Decode, de-duplicate, process and commit one Kafka batch. `run` calls it in a worker
        thread for every fetch. A partition whose fetch held only skipped records (transaction
        markers) still gets its next offset stored."""
        txn = Transaction(self.store)
        applied_before = self.stats.applied
        new_positions: dict[int, int] = {}
        for tp, records in batches.items():
            partition = tp.partition
            next_offset = records.next_offset
            if not len(records):
                txn.put(offset_key(partition, self.topic), BIG_I64.pack(next_offset))
                new_positions[partition] = next_offset
                continue
            events = self._decode(records.values)
            # A batch spans seconds, so its last record time stands for all of them in the
            # day-granular de-duplication memory.
            day = records.last_timestamp // MS_PER_DAY
            self.seen.sweep(self.store, partition, day, self.seen.sweep_factor * len(records), txn)
            rows = self.seen.keep_new_ids(partition, events.event_id, day, txn)
            duplicates = len(events) - len(rows)
            fresh = events.take(rows) if duplicates else events
            if len(fresh):
                apply_decoded = getattr(self.processor, "apply_decoded", None)
                if apply_decoded is not None:
                    apply_decoded(partition, fresh, txn)
                else:
                    self.processor.apply(partition, fresh.messages(), txn)
                self._raise_watermark(partition, int(fresh.seconds.max()), txn)
            txn.put(offset_key(partition, self.topic), BIG_I64.pack(next_offset))
            new_positions[partition] = next_offset
            self.stats.records += len(records)
            self.stats.applied += len(fresh)
            self.stats.duplicates += duplicates
            self._duplicates.inc(duplicates)
        txn.commit()
        self._write_stalls.inc(txn.stalled_s)
        fetched = sum(map(len, batches.values()))
        self.batch_limit = batch_limit(fetched, txn.bytes_written, self.batch_bytes, self.batch_max)
        # The processor publishes what it serves queries from (the recommender's view) before
        # the positions move: a partition counts as caught up, and may be answered for, only
        # once the state that reached its end offset is visible to the queries.
        self.processor.committed()
        self.catch_up.advance(new_positions)
        self.stats.batches += 1
        self._consumed.inc(fetched)
        self._applied.inc(self.stats.applied - applied_before)

    def _decode(self, raw_values: Sequence[bytes | None]) -> EventBatch:
        """The records that are applicable ViewEvents, in offset order (the hot loop): decoded
        as columns for the whole batch; only records in an unusual encoding are parsed by
        protobuf one at a time (and those it cannot parse are counted and skipped). A record
        without a value (a tombstone from another producer) reads as an empty, invalid event."""
        values: list[bytes] = (
            [b"" if value is None else value for value in raw_values]
            if None in raw_values
            else list(raw_values)  # type: ignore[arg-type] # no None, checked in C
        )
        # A small batch (a lone event of an idle stream) goes straight to protobuf, to which
        # the scan defers anyway (SCAN_MIN_RECORDS).
        if len(values) >= SCAN_MIN_RECORDS:
            columns = decode_view_events(values)
        else:
            columns = unscanned(len(values))
        decoded = columns.fast.copy()
        event_ids = columns.event_id
        for row in np.flatnonzero(~columns.fast).tolist():
            try:
                event = ViewEvent.FromString(values[row])
            except Exception:  # noqa: BLE001 - a foreign record must not stop the consumer
                self.stats.undecodable += 1
                continue
            decoded[row] = True
            event_ids[row] = event.event_id.encode()
            columns.media_id[row] = event.media_id
            columns.user_id[row] = event.user_id
            columns.event_type[row] = event.event_type
            columns.has_time[row] = event.HasField("event_time")
            columns.seconds[row] = event.event_time.seconds
        applicable = (
            decoded
            & (np.fromiter(map(len, event_ids), np.int64, len(event_ids)) > 0)
            & (columns.media_id > 0)
            & (columns.user_id > 0)
            & (columns.event_type >= 1)
            & (columns.event_type <= 4)
            & columns.has_time
        )
        self.stats.invalid += int(decoded.sum() - applicable.sum())
        batch = EventBatch(
            event_ids,
            columns.media_id,
            columns.user_id,
            columns.event_type,
            columns.seconds,
            values,
        )
        return batch if applicable.all() else batch.take(np.flatnonzero(applicable))

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
        owner = self.owner
        async with owner._apply_lock:  # no batch is half-applied while partitions move
            # What this member applied, for whoever is taken back into the group next
            # (CatchUp.assign); refused when the group already dropped this member.
            await owner._commit_group_offsets(timeout=1.0)
            owner.catch_up.revoke((tp.partition for tp in revoked), owner._group_generation())
            owner._publish()  # not caught up (and NOT_SERVING) until the new assignment is
        if revoked:
            log.info("revoked partitions %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        owner = self.owner
        async with owner._apply_lock:
            stored = await owner._seek_to_stored(list(assigned))
            generation = owner._group_generation()
            taken_back = owner.catch_up.taken_back((tp.partition for tp in assigned), generation)
            committed = await owner._group_offsets(taken_back) if taken_back else None
            furthest = owner._assignor.furthest
            owner.catch_up.assign(
                (tp.partition for tp in assigned), stored, generation, committed, furthest
            )
            if taken_back:
                log.info(
                    "the group took this instance back after a break; of partitions %s it was "
                    "caught up on, %s answer on at once (group offsets %s, stored %s, the "
                    "furthest any member's store is %s)",
                    taken_back,
                    sorted(owner.catch_up.settled),
                    committed,
                    {p: stored.get(p) for p in taken_back},
                    {p: furthest.get(p) for p in taken_back},
                )
            owner.seen.retain(tp.partition for tp in assigned)
            owner._publish()
        log.info(
            "assigned partitions %s; resuming from stored offsets %s",
            sorted(tp.partition for tp in assigned),
            stored,
        )
