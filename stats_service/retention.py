"""Minute retention: a day's minute detail is pruned once the partition's event time has moved
`stats_minute_retention_days` past the day's end, so that state stops growing by the largest
part of it (the minute sets, twice per viewer-day, up to 180 bytes each, and the minute buckets
of each media-hour row, up to 1,200 bytes). Hour and day buckets, the ranking index and the totals stay.

A pruned day's minute sets become 3-byte hour masks and its hour rows keep only the hour bucket
(key_layout). The processor excludes from buckets any event older than the retention before
the running maximum event time (the same offset-order cut-off as the trend retention), so a
pruned day is never written again. The cut-off is the running maximum *after* the batch and a
day is pruned in the batch that moves it past the cut-off, including what that batch itself
wrote to it; so the state after a given offset does not depend on how the stream was cut into
batches, and replays after a crash are identical.
"""

from __future__ import annotations

import numpy as np

from stats_service import key_layout as k
from stats_service.aggregation import ViewerDays
from stats_service.request_parsing import floor_to
from viewevents.state.codecs import BIG_I64
from viewevents.state.keys import partition_prefix, prefix_end
from viewevents.state.transaction import Transaction


def prune_due_days(
    txn: Transaction,
    partition: int,
    watermark: int,
    retention_seconds: int,
    batch_days: ViewerDays,
    batch_hours: list[np.ndarray],
) -> list[int]:
    """Prune every day wholly older than `watermark - retention_seconds` that is not pruned
    yet; returns the days pruned. `batch_days` and `batch_hours` ([media, hour start]) are the
    batch's own viewer-days and hour rows: written in this transaction, not yet in the store."""
    cut = floor_to(watermark - retention_seconds, k.DAY)
    key = k.minutes_kept_from_key(partition)
    stored = txn.get(key)
    if stored is not None:
        first: int | None = BIG_I64.unpack(stored)[0]
    else:
        first = _first_day(txn, partition, batch_days)
    days = list(range(first, cut, k.DAY)) if first is not None else []
    for day in days:
        _prune_day(txn, partition, day, batch_days, batch_hours)
    # Days before the cut are pruned or empty, and no later event can land there (buckets
    # skip events older than the retention): the next prune starts at the cut.
    if stored is None or first is None or cut > first:
        txn.put(key, BIG_I64.pack(cut))
    return days


def _first_day(txn: Transaction, partition: int, batch_days: ViewerDays) -> int | None:
    """The oldest day with bitmaps, stored or in this batch."""
    prefix = k.presence_by_day_prefix(partition)
    found = [int(batch_days.day.min())] if len(batch_days) else []
    for stored_key, _ in txn.store.scan(prefix, prefix_end(prefix)):
        found.append(k.unbiased(stored_key[len(prefix) : len(prefix) + 8]))
        break
    return min(found) if found else None


def _prune_day(
    txn: Transaction,
    partition: int,
    day: int,
    batch_days: ViewerDays,
    batch_hours: list[np.ndarray],
) -> None:
    prefix = partition_prefix(partition)
    by_day = k.presence_by_day_prefix(partition) + k.biased(day)
    stored = [key for key, _ in txn.store.scan(by_day, prefix_end(by_day))]
    mine = batch_days.day == day
    fresh = k.pack_keys(
        prefix + k.KIND_PRESENCE_BY_DAY,
        [batch_days.day[mine], batch_days.media[mine], batch_days.user[mine]],
        (True, False, False),
    )
    q_keys = sorted(set(stored) | set(fresh))
    if q_keys:
        values = txn.get_many(q_keys)
        keep = [i for i, v in enumerate(values) if v is not None and len(v) != k.HOUR_MASK_BYTES]
        if keep:
            q_kept = [q_keys[i] for i in keep]
            masks = k.hour_mask_values([values[i] for i in keep])  # type: ignore[misc]
            media, user = k.key_columns(q_kept, 1), k.key_columns(q_kept, 2)
            p_keys = k.pack_keys(
                prefix + k.KIND_PRESENCE,
                [media, np.full(len(media), day, np.int64), user],
                (False, True, False),
            )
            txn.put_many(zip(q_kept, masks))
            txn.put_many(zip(p_keys, masks))
    rank = k.rank_prefix(partition, k.HOUR)
    index = [key for key, _ in txn.store.scan(rank + k.biased(day), rank + k.biased(day + k.DAY))]
    h_keys = {k.hour_row_key_of_rank_key(partition, key) for key in index}
    media, hour = batch_hours
    mine = (hour >= day) & (hour < day + k.DAY)
    h_keys.update(
        k.pack_keys(prefix + k.KIND_BUCKET[k.HOUR], [media[mine], hour[mine]], (False, True))
    )
    if h_keys:
        ordered = sorted(h_keys)
        values = txn.get_many(ordered)
        bucket = 8 * k.BUCKET_FIELDS
        txn.put_many(
            (key, value[:bucket])
            for key, value in zip(ordered, values)
            if value is not None and len(value) > bucket
        )
