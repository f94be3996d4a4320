"""The stats consumer's Processor: one partition batch in, combined rows out to the transaction.

Per batch it reads each touched key once (one multi-get per key kind) and writes each changed
key once; the shared consumer commits these writes with the offsets in one RocksDB write batch.
"""

from __future__ import annotations

import numpy as np

from stats_service import keys as k
from stats_service.aggregation import (
    Columns,
    aggregate,
    merge_buckets,
    merge_totals,
    merge_viewer_days,
)
from viewevents.state import Transaction, partition_prefix


class StatsProcessor:
    """Implements viewevents.consumer.Processor for the stats service.

    Holds no state of its own between batches (everything is in RocksDB), so gRPC handlers in
    other threads never race with it.
    """

    def __init__(self, heartbeat_seconds: int = 30, trend_retention_days: int = 0) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.retention_seconds = max(0, trend_retention_days) * k.DAY
        self.events_outside_retention = 0

    def apply(self, partition: int, events: list, txn: Transaction) -> None:
        """Fold `events` (valid, de-duplicated, offset order) of one partition into `txn`."""
        if not events:
            return
        self.apply_columns(partition, Columns.from_events(events), txn)

    def committed(self) -> None:
        """Nothing is cached, so nothing to refresh."""

    def apply_columns(self, partition: int, columns: Columns, txn: Transaction) -> None:
        prefix = partition_prefix(partition)
        pending = txn.pending  # bulk writes: one dict update per key kind, not a call per key
        watermark_key = prefix + k.KIND_WATERMARK
        stored = txn.get(watermark_key)
        batch = aggregate(columns, None if stored is None else k.decode_i64(stored),
                          self.retention_seconds)
        pending[watermark_key] = k.encode_i64(batch.watermark)
        self.events_outside_retention += len(columns) - batch.trended

        # All-time viewers: a presence key per (media, user); absent means a new viewer.
        viewer_keys = k.pack_keys(prefix + k.KIND_VIEWER, batch.viewers, (False, False))
        is_new = np.array([v is None for v in txn.get_many(viewer_keys)], bool)
        pending.update(dict.fromkeys([key for key, new in zip(viewer_keys, is_new) if new], b""))
        new_viewers = np.bincount(batch.viewer_media_index[is_new], minlength=len(batch.totals))

        totals_keys = k.pack_keys(prefix + k.KIND_TOTALS, batch.totals.keys, (False,))
        rows = k.rows_from_values(txn.get_many(totals_keys), k.EMPTY_TOTALS, k.TOTALS_FIELDS)
        merge_totals(rows, batch.totals, new_viewers, self.heartbeat_seconds)
        pending.update(zip(totals_keys, k.values_from_rows(rows)))

        # Viewer-day bitmaps give the exact new viewers of each minute, hour and day bucket.
        days = batch.viewer_days
        presence_keys = k.pack_keys(prefix + k.KIND_PRESENCE, [days.media, days.day, days.user],
                                    (False, True, False))
        changed, bitmaps, new_bucket_viewers = merge_viewer_days(
            txn.get_many(presence_keys), days)
        if len(changed):
            by_day_keys = k.pack_keys(prefix + k.KIND_PRESENCE_BY_DAY,
                                      [days.day[changed], days.media[changed], days.user[changed]],
                                      (True, False, False))
            pending.update(zip([presence_keys[i] for i in changed.tolist()], bitmaps))
            pending.update(zip(by_day_keys, bitmaps))

        for size, buckets in batch.buckets.items():
            if not len(buckets):
                continue
            media, start = buckets.keys
            bucket_keys = k.pack_keys(prefix + k.KIND_BUCKET[size], [media, start], (False, True))
            rows = k.rows_from_values(txn.get_many(bucket_keys), k.EMPTY_BUCKET, k.BUCKET_FIELDS)
            merge_buckets(rows, buckets, new_bucket_viewers[size], self.heartbeat_seconds)
            values = k.values_from_rows(rows)
            pending.update(zip(bucket_keys, values))
            if size in k.KIND_RANK:
                rank_keys = k.pack_keys(prefix + k.KIND_RANK[size], [start, media], (True, False))
                pending.update(zip(rank_keys, values))
