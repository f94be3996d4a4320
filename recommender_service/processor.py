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
from recommender_service.incremental import FlatWindows, combine_batch, pair_deltas, update_window
from recommender_service.key_layout import ItemRecord
from recommender_service.settings import RecommenderSettings
from recommender_service.view import Stamp, View
from viewevents.state import StateStore, Transaction
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

# A row is compacted when its deltas hold half as many entries as its base (amortised O(1)
# work per delta entry), at least this many, or when it has `row_max_deltas` chunks.
COMPACT_MIN_ENTRIES = 256


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
        view = View.initial(items, users, partitions, snapshot, self._stamp(0, partitions, snapshot))
        log.info("loaded %d items, %d users over partitions %s", len(items), users, list(partitions))
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

    def apply(self, partition: int, events: list[view_event_pb2.ViewEvent], txn: Transaction) -> None:
        """Fold one partition's new events into `txn`; the in-memory table follows in
        committed(), only once RocksDB has the batch."""
        cap = self.settings.history_cap
        pending = self._pending
        per_user, items_seen = combine_batch(events)
        users = list(per_user)
        user_keys = [keys.user_key(partition, u) for u in users]
        work: list[tuple[int, bytes, dict[int, int], tuple[int, ...], tuple[int, ...], bool]] = []
        lookups: list[tuple[int, int]] = []
        new_users = 0
        for user, key, value in zip(users, user_keys, txn.get_many(user_keys)):
            added = per_user[user]
            if value is None:
                new_users += 1
                if not added:
                    txn.put(key, b"")  # seen (counted in N), no view time yet
                    continue
                media, w, has_evicted = (), (), False
            elif not added:
                continue
            else:
                media, w, has_evicted = keys.decode_window(value)
            if has_evicted:
                present = set(media)
                lookups.extend((user, m) for m in added if m not in present)
            work.append((user, key, added, media, w, has_evicted))

        outside: dict[tuple[int, int], int] = {}
        if lookups:
            evicted_keys = [keys.evicted_key(partition, u, m) for u, m in lookups]
            for pair, key, value in zip(lookups, evicted_keys, txn.get_many(evicted_keys)):
                if value is not None:
                    outside[pair] = keys.decode_counts(value)
                    txn.delete(key)  # back in the window (re-written below if evicted again)

        flat = FlatWindows()
        local: dict[int, list[int]] = {}  # this partition's (dS, dQ, dn) per item
        for user, key, added, media, w, has_evicted in work:
            mine = {m: outside[(user, m)] for m in added if (user, m) in outside} if has_evicted else {}
            update = update_window(media, w, added, mine, cap)
            for item, value in update.evicted:
                txn.put(keys.evicted_key(partition, user, item), keys.encode_counts(value))
            txn.put(key, keys.encode_window(update.media, update.new,
                                            has_evicted or bool(update.evicted)))
            for item, old, new in update.changes:
                acc = local.get(item)
                if acc is None:
                    acc = local[item] = [0, 0, 0]
                acc[0] += new - old
                acc[1] += new * new - old * old
                acc[2] += old == 0
            flat.add(update)

        rows = pair_deltas(flat)
        touched_items = items_seen.union(x for x, _ in rows)
        item_ids = list(touched_items)
        item_keys = [keys.item_key(partition, m) for m in item_ids]
        records = {
            item: ItemRecord.decode(value) if value is not None else ItemRecord()
            for item, value in zip(item_ids, txn.get_many(item_keys))
        }
        deltas = pending.deltas
        for item, (ds, dq, dn) in local.items():
            record = records[item]
            record.s += ds
            record.q += dq
            record.n += dn
            acc = deltas.get(item)
            if acc is None:
                deltas[item] = [ds, dq, dn]
            else:
                acc[0] += ds
                acc[1] += dq
                acc[2] += dn
        max_deltas = self.settings.row_max_deltas
        for item, entries in rows:
            record = records[item]
            record.deltas += 1
            record.delta_entries += len(entries)
            if record.deltas > max_deltas or record.delta_entries >= max(
                    record.base_entries // 2, COMPACT_MIN_ENTRIES):
                self._compact(partition, item, record, entries, txn)
                pending.compactions += 1
            else:
                txn.put(keys.row_key(partition, item, record.deltas), entries.tobytes())
            pending.pairs += len(entries)
        for item, key in zip(item_ids, item_keys):
            txn.put(key, records[item].encode())
            if item not in deltas:
                deltas[item] = [0, 0, 0]  # known from now on, even with no view time
        if new_users:
            counts = keys.counts_key(partition)
            txn.put(counts, keys.encode_counts(keys.decode_counts(txn.get(counts)) + new_users))
            pending.new_users += new_users
        pending.changed.update(touched_items)
        self.stats.events += len(events)

    def _compact(self, partition: int, item: int, record: ItemRecord, entries: np.ndarray,
                 txn: Transaction) -> None:
        """Merge the committed base and deltas with this batch's delta into a new base."""
        prefix = keys.row_prefix(partition, item)
        chunks = [value for _, value in keys.scan(self.store.db, prefix, fill_cache=False)]
        merged = keys.aggregate_row(np.concatenate((keys.decode_row(chunks), entries)))
        for seq in range(1, record.deltas):
            txn.delete(keys.row_key(partition, item, seq))
        txn.put(keys.row_key(partition, item, 0), merged.tobytes())
        record.deltas = 0
        record.base_entries = len(merged)
        record.delta_entries = 0

    def committed(self) -> None:
        """Publish the new view: item table plus a snapshot of the state just committed."""
        pending, self._pending = self._pending, _Pending()
        snapshot = self.store.db.snapshot()
        partitions = tuple(sorted(set(self._view.partitions).union(keys.partitions_in(self.store))))
        version = self._view.version + 1
        stamp = self._stamp(version, partitions, snapshot)
        # One attribute assignment publishes the view to the query threads.
        self._view = self._view.advanced(pending.deltas, pending.changed, pending.new_users,
                                         partitions, snapshot, stamp)
        self.stats.batches += 1
        self.stats.pair_entries += pending.pairs
        self.stats.compactions += pending.compactions
