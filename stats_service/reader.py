"""Reading the stats state for queries: sums over partitions of the rows in keys.py.

Every read goes to RocksDB (its block cache bounds memory), so nothing here needs locking
against the consumer thread. A query's reads are not one snapshot: a batch committed between
two of them may show in one and not the other (rocksdict's snapshot iterators do not honour
the snapshot, so they are not used).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from stats_service import key_layout as k
from stats_service.aggregation import minute_mask
from stats_service.request_parsing import ceil_to, floor_to, tiles
from viewevents.state.keys import partition_prefix
from viewevents.state.store import StateStore


@dataclass
class Totals:
    """All-time totals of one media item over the partitions read."""

    view_time: int
    starts: int
    stops: int
    ends: int
    uniques: int
    first: int
    last: int


class StatsReader:
    """Query-side access to a StateStore written by StatsProcessor."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def stored_partitions(self) -> list[int]:
        """Partitions that have any state, found with one seek per partition."""
        found: list[int] = []
        start = b"\x00\x00"
        while True:
            first = next(iter(self.store.scan(start, b"\xff\xff\xff")), None)
            if first is None or len(first[0]) < 2:
                return found
            partition = int.from_bytes(first[0][:2], "big")
            found.append(partition)
            if partition >= 0xFFFF:
                return found
            start = partition_prefix(partition + 1)

    # --- one media item -------------------------------------------------------------------

    def totals(self, partitions: Sequence[int], media_id: int) -> Totals | None:
        values = self.store.get_many([k.totals_key(p, media_id) for p in partitions])
        rows = [k.decode_totals(v) for v in values if v is not None]
        if not rows:
            return None
        return Totals(
            view_time=sum(r[0] for r in rows), starts=sum(r[1] for r in rows),
            stops=sum(r[2] for r in rows), ends=sum(r[3] for r in rows),
            uniques=sum(r[4] for r in rows), first=min(r[5] for r in rows),
            last=max(r[6] for r in rows))

    def trend(self, partitions: Sequence[int], media_id: int, size: int, start: int, end: int
              ) -> dict[int, list[int]]:
        """Bucket start -> [view_time, starts, stops, ends, uniques] for [start, end)."""
        buckets: dict[int, list[int]] = {}
        for p in partitions:
            if size == k.DAY:
                prefix = k.bucket_prefix(p, k.DAY, media_id)
                for key, value in self.store.scan(prefix + k.biased(start),
                                                  prefix + k.biased(end)):
                    _add(buckets, k.unbiased(key[-8:]), k.decode_bucket(value))
                continue
            prefix = k.bucket_prefix(p, k.HOUR, media_id)
            items = list(self.store.scan(prefix + k.biased(floor_to(start, k.HOUR)),
                                         prefix + k.biased(ceil_to(end, k.HOUR))))
            if not items:
                continue
            rows = np.frombuffer(b"".join([v for _, v in items]), k.HOUR_ROW)
            hours = [k.unbiased(key[-8:]) for key, _ in items]
            if size == k.HOUR:
                for hour, row in zip(hours, rows["hour"].tolist()):
                    _add(buckets, hour, row)
                continue
            for hour, minutes in zip(hours, rows["minutes"]):
                for slot in np.flatnonzero(minutes[:, 4]).tolist():  # every minute has a viewer
                    minute = hour + slot * k.MINUTE
                    if start <= minute < end:
                        _add(buckets, minute, minutes[slot].tolist())
        return buckets

    def viewers(self, partitions: Sequence[int], media_id: int, start: int, end: int) -> int:
        """Exact distinct users with an event on the item in minute-aligned [start, end)."""
        users: list[np.ndarray] = []
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        for p in partitions:
            prefix = k.presence_prefix(p, media_id)
            items = list(self.store.scan(prefix + k.biased(first_day), prefix + k.biased(end_day)))
            if not items:
                continue
            keys = np.frombuffer(b"".join([key for key, _ in items]), np.uint8).reshape(
                len(items), -1)
            day = _u64_column(keys, 11).astype(np.uint64) ^ np.uint64(k.BIAS)
            inside = _in_range(day.astype(np.int64), [v for _, v in items], start, end)
            users.append(_u64_column(keys, 19)[inside])
        return len(np.unique(np.concatenate(users))) if users else 0

    # --- every media item in a range (ListTopMedia) -------------------------------------------

    def range_counts(self, partitions: Sequence[int], start: int, end: int
                     ) -> dict[int, tuple[int, int]]:
        """Media -> (view_time, starts) over minute-aligned [start, end), for every media item
        with an event there. Whole days, whole hours and the minutes at the ragged edges all
        come from sequential scans of the bucket-major index rows (edge minutes from the
        minute slots of the hour rows around them)."""
        media_parts: list[np.ndarray] = []
        value_parts: list[np.ndarray] = []
        for size, low, high in tiles(start, end):
            for p in partitions:
                if size == k.MINUTE:
                    found = self._minute_rows(p, low, high)
                else:
                    prefix = k.rank_prefix(p, size)
                    found = self._rows(self.store.scan(prefix + k.biased(low),
                                                       prefix + k.biased(high)))
                if found is not None:
                    media_parts.append(found[0])
                    value_parts.append(found[1])
        if not media_parts:
            return {}
        media = np.concatenate(media_parts)
        rows = np.concatenate(value_parts)
        unique, index = np.unique(media, return_inverse=True)
        view_time = np.bincount(index, weights=rows[:, 0], minlength=len(unique))
        starts = np.bincount(index, weights=rows[:, 1], minlength=len(unique))
        return {m: (int(v), int(s)) for m, v, s in zip(unique.tolist(), view_time.tolist(),
                                                        starts.tolist())}

    def _rows(self, items: Iterable[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray] | None:
        """(media ids, bucket rows) of index items whose key ends with the media id."""
        pairs = list(items)
        if not pairs:
            return None
        media = np.frombuffer(b"".join([key[-8:] for key, _ in pairs]), ">u8").astype(np.int64)
        rows = np.frombuffer(b"".join([v for _, v in pairs]), "<i8").reshape(
            len(pairs), k.BUCKET_FIELDS)
        return media, rows

    def _minute_rows(self, partition: int, low: int, high: int
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """Sums of the minutes in [low, high) per media item: the hour index names the items
        active in the surrounding hours, one multi-get fetches their hour rows."""
        prefix = k.rank_prefix(partition, k.HOUR)
        index = [key for key, _ in self.store.scan(prefix + k.biased(floor_to(low, k.HOUR)),
                                                   prefix + k.biased(ceil_to(high, k.HOUR)))]
        if not index:
            return None
        row_keys = [partition_prefix(partition) + k.KIND_BUCKET[k.HOUR] + key[-8:] + key[3:11]
                    for key in index]
        values = self.store.get_many(row_keys)
        rows = k.hour_rows_from_values(values)
        keys = np.frombuffer(b"".join(index), np.uint8).reshape(len(index), -1)
        hours = (_u64_column(keys, 3).astype(np.uint64) ^ np.uint64(k.BIAS)).astype(np.int64)
        minute = hours[:, None] + k.MINUTE * np.arange(60)[None, :]
        inside = (minute >= low) & (minute < high)
        sums = (rows["minutes"].astype(np.int64) * inside[:, :, None]).sum(axis=1)
        media = _u64_column(keys, 11)
        active = sums[:, 4] > 0
        return media[active], sums[active]

    def range_viewers_all(self, partitions: Sequence[int], start: int, end: int
                          ) -> dict[int, int]:
        """Media -> exact distinct users over minute-aligned [start, end), from the
        day-major bitmaps (cost: one row per viewer-day of the days the range touches)."""
        media_parts: list[np.ndarray] = []
        user_parts: list[np.ndarray] = []
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        for p in partitions:
            prefix = k.presence_by_day_prefix(p)
            items = list(self.store.scan(prefix + k.biased(first_day), prefix + k.biased(end_day)))
            if not items:
                continue
            keys = np.frombuffer(b"".join([key for key, _ in items]), np.uint8).reshape(
                len(items), -1)
            day = _u64_column(keys, 3).astype(np.uint64) ^ np.uint64(k.BIAS)
            inside = _in_range(day.astype(np.int64), [v for _, v in items], start, end)
            media_parts.append(_u64_column(keys, 11)[inside])
            user_parts.append(_u64_column(keys, 19)[inside])
        if not media_parts:
            return {}
        media, user = np.concatenate(media_parts), np.concatenate(user_parts)
        pairs = np.unique(np.stack([media, user], axis=1), axis=0)
        found, counts = np.unique(pairs[:, 0], return_counts=True)
        return dict(zip(found.tolist(), counts.tolist()))

    def range_viewers_of(self, partitions: Sequence[int], media_ids: Iterable[int], start: int,
                         end: int) -> dict[int, int]:
        return {m: self.viewers(partitions, m, start, end) for m in media_ids}


def _add(buckets: dict[int, list[int]], start: int, row: Sequence[int]) -> None:
    have = buckets.get(start)
    if have is None:
        buckets[start] = list(row)
    else:
        for i in range(k.BUCKET_FIELDS):
            have[i] += row[i]


def _u64_column(keys: np.ndarray, offset: int) -> np.ndarray:
    """The big-endian 8-byte field at `offset` of fixed-length keys, as int64."""
    return np.ascontiguousarray(keys[:, offset:offset + 8]).view(">u8")[:, 0].astype(np.int64)


def _in_range(days: np.ndarray, bitmaps: list[bytes], start: int, end: int) -> np.ndarray:
    """Which viewer-day bitmaps have a minute inside [start, end)."""
    inside = np.ones(len(days), bool)
    partial = np.flatnonzero((days < start) | (days + k.DAY > end))
    for day in np.unique(days[partial]).tolist():
        rows = partial[days[partial] == day]
        mask = _day_mask(day, start, end) or 0
        mask_bytes = np.frombuffer(mask.to_bytes(k.BITMAP_BYTES, "little"), np.uint8)
        bits = np.frombuffer(b"".join([bitmaps[i] for i in rows.tolist()]), np.uint8).reshape(
            len(rows), k.BITMAP_BYTES)
        inside[rows] = (bits & mask_bytes).any(axis=1)
    return inside


def _day_mask(day: int, start: int, end: int) -> int | None:
    """Minutes of `day` inside [start, end); None when the whole day is inside."""
    if start <= day and day + k.DAY <= end:
        return None
    return minute_mask((start - day) // k.MINUTE, (end - day) // k.MINUTE)

