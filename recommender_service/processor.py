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
    BatchPlan,
    base_due,
    compaction_due,
    locate,
    outside_mask,
    plan_batch,
)
from recommender_service.hot_rows import HotRows
from recommender_service.incremental import Raised, combine_arrays, pair_deltas
from recommender_service.settings import RecommenderSettings
from recommender_service.view import Stamp, View
from viewevents.consumer import EventBatch
from viewevents.state.keys import prefix_end
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """What the current (uncommitted) consumer batch changes in the in-memory item table."""

    items: list[np.ndarray] = field(default_factory=list)
    """Items touched, with their (dS, dQ, dn) rows in `deltas` (zeros: known from now on)."""
    deltas: list[np.ndarray] = field(default_factory=list)
    new_users: int = 0
    pairs: int = 0
    compactions: int = 0
    base_rewrites: int = 0


@dataclass
class ProcessorStats:
    """Counters since start (logs and the benchmark)."""

    batches: int = 0
    events: int = 0
    pair_entries: int = 0
    compactions: int = 0  # of both kinds
    base_rewrites: int = 0  # the major ones


class RecommenderProcessor:
    """Maintains S, Q, n, D, c and N incrementally; publishes a `View` after every commit."""

    def __init__(self, store: StateStore, topic: str, settings: RecommenderSettings) -> None:
        self.store = store
        self.topic = topic
        self.settings = settings
        self.stats = ProcessorStats()
        self._pending = _Pending()
        self.hot = HotRows(settings.hot_rows, settings.hot_rows_mb * 1024 * 1024)
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
        columns = [
            np.fromiter((getattr(e, name) for e in events), np.int64, len(events))
            for name in ("user_id", "media_id", "event_type")
        ]
        self._fold(partition, combine_arrays(*columns), len(events), txn)

    def apply_decoded(self, partition: int, batch: EventBatch, txn: Transaction) -> None:
        """`apply` of the consumer's decoded columns: no ViewEvent message per event."""
        raised = combine_arrays(batch.user_id, batch.media_id, batch.event_type)
        self._fold(partition, raised, len(batch), txn)

    def _fold(self, partition: int, raised: Raised, events: int, txn: Transaction) -> None:
        user_keys = keys.user_keys(partition, raised.users)
        stored = keys.decode_windows(self.hot.get_many(txn, user_keys))
        slot = locate(raised, stored)
        outside = np.zeros(len(slot), dtype=np.int64)
        lookup = np.flatnonzero(outside_mask(raised, stored, slot))
        if len(lookup):
            outside_keys = keys.evicted_keys(
                partition, raised.users[raised.user[lookup]], raised.media[lookup]
            )
            for at, key, value in zip(
                lookup.tolist(), outside_keys, txn.get_many(outside_keys), strict=True
            ):
                if value is not None:
                    outside[at] = keys.decode_counts(value)
                    txn.delete(key)  # back in the window (re-written if evicted again)
        plan = plan_batch(raised, stored, slot, outside, self.settings.history_cap)
        if len(plan.seen_only):
            self._put(txn, keys.user_keys(partition, plan.seen_only), [b""] * len(plan.seen_only))
        if len(plan.evicted_users):
            txn.put_many(
                zip(
                    keys.evicted_keys(partition, plan.evicted_users, plan.evicted_media),
                    keys.encode_many_counts(plan.evicted_w),
                    strict=True,
                )
            )
        self._put(
            txn,
            keys.user_keys(partition, plan.window_users),
            keys.encode_windows(plan.has_evicted, plan.lengths, plan.media, plan.new),
        )
        row_items, entries, bounds = pair_deltas(
            plan.media, plan.new, plan.old, plan.touched, plan.lengths
        )
        self._apply_items(partition, raised.items, plan, row_items, entries, bounds, txn)
        if plan.new_users:
            counts = keys.counts_key(partition)
            txn.put(
                counts, keys.encode_counts(keys.decode_counts(txn.get(counts)) + plan.new_users)
            )
            self._pending.new_users += plan.new_users
        self.stats.events += events

    def _apply_items(
        self,
        partition: int,
        seen: np.ndarray,
        plan: BatchPlan,
        row_items: np.ndarray,
        entries: np.ndarray,
        bounds: np.ndarray,
        txn: Transaction,
    ) -> None:
        """Item sums and neighbour-row chunks of the batch (row k's entries are
        entries[bounds[k]:bounds[k + 1]]); rows due are compacted."""
        items = np.union1d(np.union1d(seen, plan.items), row_items)
        item_keys = keys.item_keys(partition, items)
        records = keys.decode_items(self.hot.get_many(txn, item_keys))
        deltas = np.zeros((len(items), 3), dtype=np.int64)
        at = np.searchsorted(items, plan.items)
        deltas[at, 0], deltas[at, 1], deltas[at, 2] = plan.ds, plan.dq, plan.dn
        records["s"] += deltas[:, 0]
        records["q"] += deltas[:, 1]
        records["n"] += deltas[:, 2]
        pending = self._pending
        pending.items.append(items)
        pending.deltas.append(deltas)
        if len(row_items):
            at = np.searchsorted(items, row_items)
            sizes = np.diff(bounds)
            records["deltas"][at] += 1
            records["delta_entries"][at] += sizes
            chunks = records["deltas"][at]
            due = compaction_due(
                chunks,
                records["delta_entries"][at],
                records["base_entries"][at],
                self.settings.row_max_deltas,
            )
            blind = np.flatnonzero(~due)
            data = entries.tobytes()
            size = entries.itemsize
            txn.put_many(
                zip(
                    keys.row_keys(partition, row_items[blind], chunks[blind]),
                    [
                        data[size * lo : size * hi]
                        for lo, hi in zip(
                            bounds[blind].tolist(), bounds[blind + 1].tolist(), strict=True
                        )
                    ],
                    strict=True,
                )
            )
            major = base_due(records["delta_entries"][at], records["base_entries"][at])
            for k in np.flatnonzero(due).tolist():
                record = records[at[k]]
                merged = self._compact(
                    partition,
                    int(row_items[k]),
                    int(chunks[k]),
                    entries[bounds[k] : bounds[k + 1]],
                    txn,
                    first=0 if major[k] else 1,
                )
                if major[k]:  # a new base, no deltas left
                    record["deltas"], record["base_entries"], record["delta_entries"] = 0, merged, 0
                    pending.base_rewrites += 1
                else:  # the base as it was, one merged delta chunk
                    record["deltas"], record["delta_entries"] = 1, merged
                pending.compactions += 1
            pending.pairs += len(entries)
        self._put(txn, item_keys, keys.encode_items(records))

    def _put(self, txn: Transaction, names: list[bytes], values: list[bytes]) -> None:
        """Write hot keys: into the batch, and into the hot rows once it is committed."""
        txn.put_many(zip(names, values, strict=True))
        self.hot.stage(names, values)

    def _compact(
        self,
        partition: int,
        item: int,
        deltas: int,
        entries: np.ndarray,
        txn: Transaction,
        first: int = 0,
    ) -> int:
        """Merge the committed chunks `first` .. `deltas - 1` of a row with this batch's delta
        into chunk `first`: from 0, the base and every delta chunk make a new base (major);
        from 1, the delta chunks make one delta chunk and the base is left alone (minor). The
        merged chunk's number of entries."""
        chunks = keys.scan_values(
            self.store.db,
            keys.row_key(partition, item, first),
            fill_cache=False,
            end=prefix_end(keys.row_prefix(partition, item)),
        )
        merged = keys.aggregate_row(np.concatenate((keys.decode_row(chunks), entries)))
        for seq in range(first + 1, deltas):
            txn.delete(keys.row_key(partition, item, seq))
        txn.put(keys.row_key(partition, item, first), merged.tobytes())
        return len(merged)

    def committed(self) -> None:
        """Publish the new view: item table plus a snapshot of the state just committed."""
        pending, self._pending = self._pending, _Pending()
        self.hot.committed()
        snapshot = self.store.db.snapshot()
        partitions = tuple(sorted(set(self._view.partitions).union(keys.partitions_in(self.store))))
        version = self._view.version + 1
        stamp = self._stamp(version, partitions, snapshot)
        # One attribute assignment publishes the view to the query threads.
        items = np.concatenate(pending.items) if pending.items else np.zeros(0, np.int64)
        deltas = np.concatenate(pending.deltas) if pending.deltas else np.zeros((0, 3), np.int64)
        self._view = self._view.advanced(
            items, deltas, np.unique(items), pending.new_users, partitions, snapshot, stamp
        )
        self.stats.batches += 1
        self.stats.pair_entries += pending.pairs
        self.stats.compactions += pending.compactions
        self.stats.base_rewrites += pending.base_rewrites
