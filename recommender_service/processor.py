"""Folds view events into the recommender's statistics (the consumer framework's Processor).

Per partition batch: combine events per user, read those users' windows, compute each raised
item's old and new view time, emit the exact pair deltas inside the windows, and append one
delta chunk per touched neighbour row. Everything goes through the framework's transaction, so
it is committed in the same RocksDB write batch as the offsets (exactly-once effect). Rows are
written blind (no read-modify-write per pair); an item's row is
compacted into its base inside the same transaction once the deltas hold half as many entries
as the base (so compaction costs O(1) per delta entry, amortised) or `row_max_deltas` chunks
(which bounds what a query reads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from recommender_service import key_layout as keys
from recommender_service.batch_plan import (
    WindowPlan,
    add_item_deltas,
    add_row_chunk,
    compacted,
    outside_lookups,
    plan_windows,
)
from recommender_service.incremental import combine_batch, combine_columns, pair_deltas
from recommender_service.key_layout import ItemRecord
from recommender_service.settings import RecommenderSettings
from recommender_service.view import Stamp, View
from viewevents.consumer import EventBatch
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """What the current (uncommitted) consumer batch changes in the in-memory item table."""

    deltas: dict[int, list[int]] = field(default_factory=dict)
    changed: set[int] = field(default_factory=set)
    new_users: int = 0
    pairs: int = 0
    compactions: int = 0


@dataclass
class ProcessorStats:
    """Counters since start (logs and the benchmark)."""

    batches: int = 0
    events: int = 0
    pair_entries: int = 0
    compactions: int = 0


class RecommenderProcessor:
    """Maintains S, Q, n, D, c and N incrementally; publishes a `View` after every commit."""

    def __init__(self, store: StateStore, topic: str, settings: RecommenderSettings) -> None:
        self.store = store
        self.topic = topic
        self.settings = settings
        self.stats = ProcessorStats()
        self._pending = _Pending()
        self._view = self._load()

    @property
    def view(self) -> View:
        """The latest published view (atomic read)."""
        return self._view

    def release(self) -> None:
        """Drop the view's RocksDB snapshot: a live snapshot keeps the database (and its lock)
        open after StateStore.close()."""
        self._view.snapshot = None

    # --- start-up ----------------------------------------------------------------------------

    def _load(self) -> View:
        """The item table summed over the partitions found in RocksDB."""
        partitions = tuple(keys.partitions_in(self.store))
        users, items = keys.stored_items(self.store, partitions)
        snapshot = self.store.db.snapshot()
        view = View.initial(
            items, users, partitions, snapshot, self._stamp(0, partitions, snapshot)
        )
        log.info(
            "loaded %d items, %d users over partitions %s", len(items), users, list(partitions)
        )
        return view

    def _stamp(self, version: int, partitions: tuple[int, ...], snapshot: object) -> Stamp:
        offsets: dict[int, int] = {}
        watermark: int | None = None
        for partition in partitions:
            value = keys.snapshot_get(snapshot, keys.offset_key_of(partition, self.topic))
            if value is not None:
                offsets[partition] = keys.decode_offset(value)
            mark = keys.snapshot_get(snapshot, keys.watermark_key_of(partition))
            if mark is not None:
                seconds = keys.decode_offset(mark)
                watermark = seconds if watermark is None else max(watermark, seconds)
        return Stamp(version=version, offsets=offsets, watermark=watermark)

    # --- Processor protocol ------------------------------------------------------------------

    def apply(
        self, partition: int, events: list[view_event_pb2.ViewEvent], txn: Transaction
    ) -> None:
        """Fold one partition's new events into `txn`; the in-memory table follows in
        committed(), only once RocksDB has the batch."""
        per_user, items_seen = combine_batch(events)
        self._fold(partition, per_user, items_seen, len(events), txn)

    def apply_decoded(self, partition: int, batch: EventBatch, txn: Transaction) -> None:
        """`apply` of the consumer's decoded columns: no ViewEvent message per event."""
        per_user, items_seen = combine_columns(batch.user_id, batch.media_id, batch.event_type)
        self._fold(partition, per_user, items_seen, len(batch), txn)

    def _fold(
        self,
        partition: int,
        per_user: dict[int, dict[int, int]],
        items_seen: set[int],
        events: int,
        txn: Transaction,
    ) -> None:
        plan = self._plan_windows(partition, per_user, txn)
        for user in plan.seen_only:
            txn.put(keys.user_key(partition, user), b"")
        for user, item, value in plan.evicted:
            txn.put(keys.evicted_key(partition, user, item), keys.encode_counts(value))
        for user, media, w, has_evicted in plan.windows:
            txn.put(keys.user_key(partition, user), keys.encode_window(media, w, has_evicted))
        rows = pair_deltas(plan.flat)
        self._apply_items(
            partition, items_seen.union(x for x, _ in rows), plan.item_deltas, rows, txn
        )
        if plan.new_users:
            counts = keys.counts_key(partition)
            txn.put(
                counts, keys.encode_counts(keys.decode_counts(txn.get(counts)) + plan.new_users)
            )
            self._pending.new_users += plan.new_users
        self.stats.events += events

    def _plan_windows(
        self, partition: int, per_user: dict[int, dict[int, int]], txn: Transaction
    ) -> WindowPlan:
        """Read the batch users' windows and their view times stored outside, then plan."""
        users = list(per_user)
        values = txn.get_many([keys.user_key(partition, u) for u in users])
        windows = {u: None if v is None else keys.decode_window(v) for u, v in zip(users, values)}
        lookups = outside_lookups(per_user, windows)
        outside: dict[tuple[int, int], int] = {}
        if lookups:
            outside_keys = [keys.evicted_key(partition, u, m) for u, m in lookups]
            for pair, key, value in zip(lookups, outside_keys, txn.get_many(outside_keys)):
                if value is not None:
                    outside[pair] = keys.decode_counts(value)
                    txn.delete(key)  # back in the window (re-written if evicted again)
        return plan_windows(per_user, windows, outside, self.settings.history_cap)

    def _apply_items(
        self,
        partition: int,
        items: set[int],
        item_deltas: dict[int, list[int]],
        rows: list[tuple[int, np.ndarray]],
        txn: Transaction,
    ) -> None:
        """Item sums and neighbour-row chunks of the batch; rows due are compacted."""
        item_ids = list(items)
        item_keys = [keys.item_key(partition, m) for m in item_ids]
        records = {
            item: ItemRecord.decode(value) if value is not None else ItemRecord()
            for item, value in zip(item_ids, txn.get_many(item_keys))
        }
        add_item_deltas(records, item_deltas)
        pending = self._pending
        for item, delta in item_deltas.items():
            acc = pending.deltas.setdefault(item, [0, 0, 0])
            for i in range(3):
                acc[i] += delta[i]
        for item, entries in rows:
            record = records[item]
            if add_row_chunk(record, len(entries), self.settings.row_max_deltas):
                self._compact(partition, item, record, entries, txn)
                pending.compactions += 1
            else:
                txn.put(keys.row_key(partition, item, record.deltas), entries.tobytes())
            pending.pairs += len(entries)
        for item, key in zip(item_ids, item_keys):
            txn.put(key, records[item].encode())
            pending.deltas.setdefault(item, [0, 0, 0])  # known from now on, even with no views
        pending.changed.update(items)

    def _compact(
        self, partition: int, item: int, record: ItemRecord, entries: np.ndarray, txn: Transaction
    ) -> None:
        """Merge the committed base and deltas with this batch's delta into a new base."""
        prefix = keys.row_prefix(partition, item)
        chunks = [value for _, value in keys.scan(self.store.db, prefix, fill_cache=False)]
        merged = keys.aggregate_row(np.concatenate((keys.decode_row(chunks), entries)))
        for seq in range(1, record.deltas):
            txn.delete(keys.row_key(partition, item, seq))
        txn.put(keys.row_key(partition, item, 0), merged.tobytes())
        compacted(record, len(merged))

    def committed(self) -> None:
        """Publish the new view: item table plus a snapshot of the state just committed."""
        pending, self._pending = self._pending, _Pending()
        snapshot = self.store.db.snapshot()
        partitions = tuple(sorted(set(self._view.partitions).union(keys.partitions_in(self.store))))
        version = self._view.version + 1
        stamp = self._stamp(version, partitions, snapshot)
        # One attribute assignment publishes the view to the query threads.
        self._view = self._view.advanced(
            pending.deltas, pending.changed, pending.new_users, partitions, snapshot, stamp
        )
        self.stats.batches += 1
        self.stats.pair_entries += pending.pairs
        self.stats.compactions += pending.compactions
