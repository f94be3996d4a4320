"""The stats consumer's Processor: one partition batch in, combined rows out to the transaction.

Per batch it reads each touched key once (one multi-get per key kind) and writes each changed
key once; the shared consumer commits these writes with the offsets in one RocksDB write batch.
"""

from __future__ import annotations

from itertools import compress

import numpy as np

from stats_service import key_layout as k
from stats_service.aggregation import (
    Columns,
    KeyedCounts,
    ViewerDays,
    aggregate,
    locate,
    merge_buckets,
    merge_totals,
    merge_viewer_days,
)
from stats_service.retention import prune_due_days
from stats_service.rollups import BucketVersions
from viewevents.consumer import EventBatch
from viewevents.state.codecs import BIG_I64
from viewevents.state.keys import partition_prefix, watermark_key
from viewevents.state.transaction import Transaction

# Hour rows in memory at once (1,240 bytes each: about 2.5 MiB). 192 rows (238 KiB, under the
# 256 KiB mmap threshold) cut the page faults of dispersed batches by a third but cost session-
# shaped batches (a few thousand hour rows) about 4 % more CPU in per-chunk calls (perf and
# benchmarks.stats_apply, in process): real viewing is session-shaped.
HOUR_ROWS_CHUNK = 2048


class StatsProcessor:
    """Implements viewevents.consumer.Processor for the stats service.

    Holds no state of its own between batches (everything is in RocksDB), so gRPC handlers in
    other threads never race with it; it only notes which rows of which buckets a batch rewrites
    and bumps the rollup cache's bucket versions (behind their own lock) after each commit.
    """

    def __init__(
        self,
        heartbeat_seconds: int = 30,
        trend_retention_days: int = 0,
        versions: BucketVersions | None = None,
        minute_retention_days: int = 0,
    ) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self.versions = versions  # the rollup cache's bucket versions, bumped after commit
        self.minute_retention_seconds = max(0, minute_retention_days) * k.DAY
        # Events older than the minute retention would land in pruned days: buckets skip them.
        self.retention_seconds = min(
            (r for r in (max(0, trend_retention_days) * k.DAY, self.minute_retention_seconds) if r),
            default=0,
        )
        self.events_outside_retention = 0

    def apply(self, partition: int, events: list, txn: Transaction) -> None:
        """Fold `events` (valid, de-duplicated, offset order) of one partition into `txn`."""
        if not events:
            return
        self.apply_columns(partition, Columns.from_events(events), txn)

    def apply_decoded(self, partition: int, batch: EventBatch, txn: Transaction) -> None:
        """`apply` on the consumer's decoded columns: no per-event Python work at all."""
        if len(batch):
            self.apply_columns(
                partition,
                Columns(batch.media_id, batch.user_id, batch.event_type, batch.seconds),
                txn,
            )

    def committed(self) -> None:
        """The batch's buckets are on disk: cached rollups of them are stale from now on."""
        if self.versions is not None:
            self.versions.publish()

    def apply_columns(self, partition: int, columns: Columns, txn: Transaction) -> None:
        prefix = partition_prefix(partition)
        # The framework's watermark (highest event time applied) is the retention cut-off too.
        stored = txn.get(watermark_key(partition))
        batch = aggregate(
            columns, None if stored is None else BIG_I64.unpack(stored)[0], self.retention_seconds
        )
        txn.put(watermark_key(partition), BIG_I64.pack(batch.watermark))
        self.events_outside_retention += len(columns) - batch.trended
        if self.versions is not None:  # the ranking rows (h, d) this batch rewrites
            for size in (k.HOUR, k.DAY):
                media, starts = batch.buckets[size].keys
                self.versions.note(partition, size, starts, media)

        # All-time viewers: a presence key per (media, user); absent means a new viewer.
        viewer_keys = k.pack_keys(prefix + k.KIND_VIEWER, batch.viewers, (False, False))
        is_new = k.absent(txn.get_many(viewer_keys))
        txn.put_many(dict.fromkeys(compress(viewer_keys, is_new.tolist()), b""))
        new_viewers = np.bincount(batch.viewer_media_index[is_new], minlength=len(batch.totals))

        totals_keys = k.pack_keys(prefix + k.KIND_TOTALS, batch.totals.keys, (False,))
        rows = k.rows_from_values(txn.get_many(totals_keys), k.EMPTY_TOTALS, k.TOTALS_FIELDS)
        merge_totals(rows, batch.totals, new_viewers, self.heartbeat_seconds)
        txn.put_many(zip(totals_keys, k.values_from_rows(rows)))

        # Viewer-day bitmaps give the exact new viewers of each minute, hour and day bucket.
        days = batch.viewer_days
        presence_keys = k.pack_keys(
            prefix + k.KIND_PRESENCE, [days.media, days.day, days.user], (False, True, False)
        )
        changed, bitmaps, new_bucket_viewers = merge_viewer_days(txn.get_many(presence_keys), days)
        if len(changed):
            by_day_keys = k.pack_keys(
                prefix + k.KIND_PRESENCE_BY_DAY,
                [days.day[changed], days.media[changed], days.user[changed]],
                (True, False, False),
            )
            txn.put_many(zip([presence_keys[i] for i in changed.tolist()], bitmaps))
            txn.put_many(zip(by_day_keys, bitmaps))
            if self.versions is not None:  # the day-major viewer rows (Q) this batch rewrites
                self.versions.note(
                    partition, k.DAY, days.day[changed], days.media[changed], days.user[changed]
                )

        # Day rows, and hour rows that carry their minutes (one key per media-hour).
        self._write_days(prefix, batch.buckets[k.DAY], new_bucket_viewers[k.DAY], txn)
        hours = batch.buckets[k.HOUR]
        if len(hours):
            self._write_hours(prefix, hours, batch.buckets[k.MINUTE], new_bucket_viewers, txn)
        if self.minute_retention_seconds:
            self._prune(partition, batch.watermark, days, hours.keys, txn)

    def _prune(
        self,
        partition: int,
        watermark: int,
        days: ViewerDays,
        hours: list[np.ndarray],
        txn: Transaction,
    ) -> None:
        """Minute retention (stats_service.retention), after the batch's own writes."""
        pruned = prune_due_days(
            txn, partition, watermark, self.minute_retention_seconds, days, hours
        )
        if pruned and self.versions is not None:
            starts = np.asarray(pruned, np.int64)
            self.versions.touch(partition, k.DAY, starts)
            self.versions.touch(
                partition, k.HOUR, (starts[:, None] + k.HOUR * np.arange(24)).reshape(-1)
            )

    def _write_hours(
        self,
        prefix: bytes,
        hours: KeyedCounts,
        minutes: KeyedCounts,
        new_viewers: dict[int, KeyedCounts],
        txn: Transaction,
    ) -> None:
        """Hour rows, which carry their minutes (one key per media-hour), and their ranking
        copies. A full hour row is 1,240 bytes in memory, so they are read, merged and written
        HOUR_ROWS_CHUNK at a time: a batch of dispersed events (nearly one media-hour each)
        held all of them at once, the largest part of the batch in flight (tracemalloc)."""
        media, start = hours.keys
        hour_keys = k.pack_keys(prefix + k.KIND_BUCKET[k.HOUR], [media, start], (False, True))
        rank_keys = k.pack_keys(prefix + k.KIND_RANK[k.HOUR], [start, media], (True, False))
        hour_deltas = merge_buckets(
            np.zeros((len(hours), k.BUCKET_FIELDS), np.int64),
            hours,
            new_viewers[k.HOUR],
            self.heartbeat_seconds,
        )
        minute_deltas = merge_buckets(
            np.zeros((len(minutes), k.BUCKET_FIELDS), np.int64),
            minutes,
            new_viewers[k.MINUTE],
            self.heartbeat_seconds,
        ).astype(np.int32)
        minute_media, minute_start = minutes.keys
        hour_of_minute = minute_start // k.HOUR * k.HOUR
        # Bucket keys are sorted by (media, start) (aggregation.keyed_counts), so the minutes'
        # hour rows never decrease and each chunk's minutes are one slice.
        minute_row = locate([minute_media, hour_of_minute], hours.keys)
        minute_slot = (minute_start - hour_of_minute) // k.MINUTE
        lows = range(0, len(hours), HOUR_ROWS_CHUNK)
        edges = np.searchsorted(minute_row, [*lows, len(hours)]).tolist()
        for low, first, last in zip(lows, edges, edges[1:]):
            high = min(low + HOUR_ROWS_CHUNK, len(hours))
            rows = k.hour_rows_from_values(txn.get_many(hour_keys[low:high]))
            rows["hour"] += hour_deltas[low:high]
            # (row, slot) pairs are distinct, so the fancy-indexed += adds each minute once.
            part = slice(first, last)
            rows["minutes"][minute_row[part] - low, minute_slot[part]] += minute_deltas[part]
            txn.put_many(zip(hour_keys[low:high], k.hour_row_values(rows)))
            # The ranking copy holds only the hour's own bucket: whole-hour tiles scan it.
            txn.put_many(zip(rank_keys[low:high], k.values_from_rows(rows["hour"])))

    def _write_days(
        self, prefix: bytes, days: KeyedCounts, new_viewers: KeyedCounts, txn: Transaction
    ) -> None:
        if not len(days):
            return
        media, start = days.keys
        day_keys = k.pack_keys(prefix + k.KIND_BUCKET[k.DAY], [media, start], (False, True))
        rows = k.rows_from_values(txn.get_many(day_keys), k.EMPTY_BUCKET, k.BUCKET_FIELDS)
        merge_buckets(rows, days, new_viewers, self.heartbeat_seconds)
        values = k.values_from_rows(rows)
        txn.put_many(zip(day_keys, values))
        rank_keys = k.pack_keys(prefix + k.KIND_RANK[k.DAY], [start, media], (True, False))
        txn.put_many(zip(rank_keys, values))
