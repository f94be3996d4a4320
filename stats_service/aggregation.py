"""Folding a batch of view events into per-media totals, trend buckets and viewer bitmaps.

Pure functions, no I/O: the processor reads the stored rows, these functions combine them with
the batch, and the processor writes the results. The batch is handled as numpy columns so that
the per-event work is a handful of vectorized sorts and counts instead of Python loops; Python
only loops over distinct keys (media items, buckets, viewer-days), of which a batch has far
fewer than events.

Unique viewers are exact. For each (media, UTC day, user) a 1440-bit bitmap records the minutes
of that day in which the user had an event on the item (stored as a minute list while that is
shorter, see key_layout; here always the bitmap). When a batch sets a bit that was clear, the
minute bucket gains a viewer; when it sets the first bit of an hour, the hour bucket gains
one; when the bitmap did not exist, the day bucket gains one. All-time viewers use a presence key
per (media, user). Since Kafka keys records by user, one user's events all live in one
partition, so these per-partition counts add up exactly across partitions.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stats_service.key_layout import (
    DAY,
    HOUR,
    MINUTE,
    MINUTES_PER_DAY,
    absent,
    presence_bitmaps,
    presence_values,
)

START, WAYPOINT, STOP, END = 1, 2, 3, 4
BUCKET_SIZES = (MINUTE, HOUR, DAY)
_NO_TIME = np.iinfo(np.int64).min
_FIELDS = tuple(
    operator.attrgetter(name)
    for name in ("media_id", "user_id", "event_type", "event_time.seconds")
)


@dataclass
class Columns:
    """One partition's new events as parallel arrays, in offset order."""

    media: np.ndarray
    user: np.ndarray
    kind: np.ndarray
    seconds: np.ndarray

    def __len__(self) -> int:
        return len(self.media)

    @classmethod
    def from_events(cls, events: Sequence[object]) -> Columns:
        """Columns of ViewEvent messages: the only per-event Python work of the hot path, done
        by C-level iteration (attribute access on protobuf messages is what it costs)."""
        count = len(events)
        return cls(*(np.fromiter(map(getter, events), np.int64, count) for getter in _FIELDS))

    @classmethod
    def from_tuples(cls, rows: Iterable[tuple[int, int, int, int]]) -> Columns:
        """Columns of (media_id, user_id, event_type, event_seconds) tuples (tests, tools)."""
        table = np.array(list(rows), np.int64).reshape(-1, 4)
        return cls(table[:, 0], table[:, 1], table[:, 2], table[:, 3])


@dataclass
class KeyedCounts:
    """Event counts per distinct key: `keys` are parallel columns, `counts` has one row per
    key with columns starts, waypoints, stops, ends."""

    keys: list[np.ndarray]
    counts: np.ndarray
    first: np.ndarray | None = None
    last: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.counts)


@dataclass
class ViewerDays:
    """Distinct (media, day, user) of a batch, and the distinct minutes of the day in which
    each had events (`group` points every minute row at its viewer-day)."""

    media: np.ndarray
    day: np.ndarray
    user: np.ndarray
    group: np.ndarray
    minute: np.ndarray

    def __len__(self) -> int:
        return len(self.media)


@dataclass
class BatchAggregate:
    """Everything one partition batch adds, before it meets the stored state."""

    totals: KeyedCounts  # keys: [media]; with first/last event time
    viewers: list[np.ndarray]  # [media, user], distinct
    viewer_media_index: np.ndarray  # row of `totals` of each viewer pair
    buckets: dict[int, KeyedCounts]  # bucket size -> keys [media, bucket start]
    viewer_days: ViewerDays
    watermark: int  # running maximum event time after this batch
    trended: int  # events inside the retention window (the others count in totals only)


def group_by(columns: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by the columns (first is most significant).

    Returns (order, starts, group): `order` sorts the rows, `starts` are the positions in sorted
    order where a new distinct key begins, `group` is each sorted row's group number.
    """
    count = len(columns[0])
    if count == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    order = (
        np.lexsort(tuple(reversed(columns)))
        if len(columns) > 1
        else np.argsort(columns[0], kind="stable")
    )
    change = np.zeros(count, bool)
    change[0] = True
    for column in columns:
        ordered = column[order]
        change[1:] |= ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(change)
    group = np.cumsum(change) - 1
    return order, starts, group


def _count_kinds(group: np.ndarray, kinds: np.ndarray, groups: int) -> np.ndarray:
    """Counts per group of event types 1..4 (columns starts, waypoints, stops, ends)."""
    flat = np.bincount(group * 4 + (kinds - 1), minlength=groups * 4)
    return flat.reshape(groups, 4).astype(np.int64)


def keyed_counts(
    columns: Sequence[np.ndarray], kinds: np.ndarray, seconds: np.ndarray | None = None
) -> KeyedCounts:
    order, starts, group = group_by(columns)
    keys = [c[order][starts] for c in columns]
    counts = _count_kinds(group, kinds[order], len(starts))
    first = last = None
    if seconds is not None and len(starts):
        ordered = seconds[order]
        first = np.minimum.reduceat(ordered, starts)
        last = np.maximum.reduceat(ordered, starts)
    return KeyedCounts(keys, counts, first, last)


def retention_mask(
    seconds: np.ndarray, stored_watermark: int | None, retention_seconds: int
) -> tuple[np.ndarray, int]:
    """Which events land in trend buckets: those no older than `retention_seconds` before the
    highest event time seen earlier in the partition (offset order, so the answer does not
    depend on how the stream was cut into batches). Also the new running maximum."""
    if len(seconds) == 0:
        return np.zeros(0, bool), stored_watermark if stored_watermark is not None else _NO_TIME
    running = np.maximum.accumulate(seconds)
    if stored_watermark is not None:
        running = np.maximum(running, stored_watermark)
    watermark = int(running[-1])
    if retention_seconds <= 0:
        return np.ones(len(seconds), bool), watermark
    return seconds >= running - retention_seconds, watermark


def viewer_days(media: np.ndarray, user: np.ndarray, seconds: np.ndarray) -> ViewerDays:
    """The distinct (media, day, user, minute of day) of a batch, grouped by viewer-day."""
    day = seconds // DAY * DAY
    minute_of_day = (seconds - day) // MINUTE
    order, starts, _ = group_by([media, day, user, minute_of_day])
    if len(order) == 0:
        empty = np.zeros(0, np.int64)
        return ViewerDays(empty, empty, empty, empty, empty)
    rows = order[starts]
    m, d, u, minutes = media[rows], day[rows], user[rows], minute_of_day[rows]
    new_day = np.ones(len(rows), bool)
    new_day[1:] = (m[1:] != m[:-1]) | (d[1:] != d[:-1]) | (u[1:] != u[:-1])
    first = np.flatnonzero(new_day)
    return ViewerDays(m[first], d[first], u[first], np.cumsum(new_day) - 1, minutes)


def aggregate(
    columns: Columns, stored_watermark: int | None, retention_seconds: int
) -> BatchAggregate:
    """Group one partition batch (valid, de-duplicated events in offset order)."""
    media, user, kinds, seconds = columns.media, columns.user, columns.kind, columns.seconds
    totals = keyed_counts([media], kinds, seconds)
    order, starts, _ = group_by([media, user])
    viewers = [media[order][starts], user[order][starts]]
    viewer_media_index = np.searchsorted(totals.keys[0], viewers[0])
    keep, watermark = retention_mask(seconds, stored_watermark, retention_seconds)
    if not keep.all():
        media, user, kinds, seconds = media[keep], user[keep], kinds[keep], seconds[keep]
    buckets = {size: keyed_counts([media, seconds // size * size], kinds) for size in BUCKET_SIZES}
    return BatchAggregate(
        totals,
        viewers,
        viewer_media_index,
        buckets,
        viewer_days(media, user, seconds),
        watermark,
        int(keep.sum()),
    )


def merge_totals(
    rows: np.ndarray, totals: KeyedCounts, new_viewers: np.ndarray, heartbeat_seconds: int
) -> np.ndarray:
    """Stored totals rows (view_time, starts, stops, ends, uniques, first, last) plus a batch."""
    counts = totals.counts
    assert totals.first is not None and totals.last is not None  # totals always carry them
    rows[:, 0] += counts[:, 1] * heartbeat_seconds
    rows[:, 1] += counts[:, 0]
    rows[:, 2] += counts[:, 2]
    rows[:, 3] += counts[:, 3]
    rows[:, 4] += new_viewers
    rows[:, 5] = np.minimum(rows[:, 5], totals.first)
    rows[:, 6] = np.maximum(rows[:, 6], totals.last)
    return rows


def merge_buckets(
    rows: np.ndarray, buckets: KeyedCounts, new_viewers: KeyedCounts, heartbeat_seconds: int
) -> np.ndarray:
    """Stored bucket rows (view_time, starts, stops, ends, uniques) plus a batch."""
    counts = buckets.counts
    rows[:, 0] += counts[:, 1] * heartbeat_seconds
    rows[:, 1] += counts[:, 0]
    rows[:, 2] += counts[:, 2]
    rows[:, 3] += counts[:, 3]
    if len(new_viewers):
        rows[locate(new_viewers.keys, buckets.keys), 4] += new_viewers.counts[:, 0]
    return rows


def merge_viewer_days(
    stored: Sequence[bytes | None], days: ViewerDays
) -> tuple[np.ndarray, list[bytes], dict[int, KeyedCounts]]:
    """Combine a batch's viewer-days with their stored minute sets (vectorized; any stored
    form, see key_layout; new values in the shorter form).

    Returns the indexes of viewer-days whose bitmap changed, their new stored values, and per
    bucket size the new unique viewers per (media, bucket start), as `KeyedCounts` whose count
    column 0 holds the number.
    """
    count = len(days)
    present = ~absent(stored)
    # The bitmaps stay packed (180 bytes per viewer-day): unpacked to one bool per minute they
    # were the batch's largest temporaries (1,440 bytes per viewer-day, three times over).
    old = presence_bitmaps(stored)
    group, minute = days.group, days.minute
    byte, bit = minute >> 3, (np.uint8(1) << (minute & 7).astype(np.uint8))
    is_new_minute = (old[group, byte] & bit) == 0
    # Rows are sorted by (viewer-day, minute), so the rows of one (viewer-day, byte) are a run:
    # OR each run's bits together, then into its byte.
    run_start = np.ones(len(group), bool)
    run_start[1:] = (group[1:] != group[:-1]) | (byte[1:] != byte[:-1])
    runs = np.flatnonzero(run_start)
    new = old.copy()
    if len(runs):
        new[group[runs], byte[runs]] |= np.bitwise_or.reduceat(bit, runs)
    changed = np.flatnonzero(np.bincount(group[is_new_minute], minlength=count))
    values = presence_values(new[changed])

    media = days.media[group]
    day = days.day[group]
    new_rows = np.flatnonzero(is_new_minute)
    minutes_added = _count_keys(media[new_rows], day[new_rows] + minute[new_rows] * MINUTE)
    hour = minute // 60
    # One row per (viewer-day, hour) whose hour had no minute before: minute rows are sorted by
    # minute within a viewer-day, so the first row of each hour run stands for the hour.
    first_of_hour = np.ones(len(group), bool)
    first_of_hour[1:] = (group[1:] != group[:-1]) | (hour[1:] != hour[:-1])
    candidates = np.flatnonzero(first_of_hour)
    hour_rows = candidates[~_hour_was_set(old, group[candidates], hour[candidates])]
    hours_added = _count_keys(media[hour_rows], day[hour_rows] + hour[hour_rows] * HOUR)
    new_days = np.flatnonzero(~present)
    days_added = _count_keys(days.media[new_days], days.day[new_days])
    return changed, values, {MINUTE: minutes_added, HOUR: hours_added, DAY: days_added}


_HOUR_BITS = np.uint64((1 << 60) - 1)


def _hour_was_set(bitmaps: np.ndarray, rows: np.ndarray, hours: np.ndarray) -> np.ndarray:
    """Whether packed minute bitmap `rows` had any minute of `hours` set. An hour's 60 bits
    start at bit 60 * hour, on a byte boundary or 4 bits into one: the 8 bytes from there,
    read as a little-endian integer, hold them all (the last hour's end at byte 180)."""
    first_bit = hours * 60
    gathered = bitmaps[rows[:, None], (first_bit >> 3)[:, None] + np.arange(8)]
    words = np.ascontiguousarray(gathered).view("<u8")[:, 0]
    return np.asarray((words >> (first_bit & 7).astype(np.uint64)) & _HOUR_BITS != 0)


def _count_keys(media: np.ndarray, start: np.ndarray) -> KeyedCounts:
    """How many rows each distinct (media, start) has, in (media, start) order."""
    order, starts, group = group_by([media, start])
    counts = np.bincount(group, minlength=len(starts)).astype(np.int64).reshape(-1, 1)
    return KeyedCounts([media[order][starts], start[order][starts]], counts)


def locate(keys: Sequence[np.ndarray], within: Sequence[np.ndarray]) -> np.ndarray:
    """Row of each (media, start) of `keys` in the sorted distinct (media, start) of `within`,
    all of which must be present there."""
    if len(keys[0]) == 0:
        return np.zeros(0, np.int64)
    media = within[0]  # sorted already: its distinct values without np.unique's sort
    distinct = np.ones(len(media), bool)
    distinct[1:] = media[1:] != media[:-1]
    media_codes = media[distinct]
    low = min(int(within[1].min()), int(keys[1].min()))
    span = max(int(within[1].max()), int(keys[1].max())) - low + 1

    def code(columns: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(np.searchsorted(media_codes, columns[0]) * span + (columns[1] - low))

    return np.asarray(np.searchsorted(code(within), code(keys)), np.int64)


def minute_mask(first_minute: int, end_minute: int) -> int:
    """Bitmap of the minutes of a day in [first_minute, end_minute)."""
    first_minute = max(0, first_minute)
    end_minute = min(MINUTES_PER_DAY, end_minute)
    if end_minute <= first_minute:
        return 0
    return ((1 << end_minute) - 1) ^ ((1 << first_minute) - 1)
