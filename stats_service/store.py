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

from stats_service import keys as k
from stats_service.aggregation import minute_mask
from stats_service.queries import ceil_to, floor_to, tiles
from viewevents.state import StateStore, partition_prefix


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
        users: set[bytes] = set()
        for p in partitions:
            prefix = k.presence_prefix(p, media_id)
            first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
            masks: dict[bytes, int | None] = {}
            for key, bitmap in self.store.scan(prefix + k.biased(first_day),
                                               prefix + k.biased(end_day)):
                day_bytes = key[-16:-8]
                if day_bytes not in masks:
                    masks[day_bytes] = _day_mask(k.unbiased(day_bytes), start, end)
                mask = masks[day_bytes]
                if mask is None or int.from_bytes(bitmap, "little") & mask:
                    users.add(key[-8:])
        return len(users)

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
                                                       prefix + k.biased(high)), size)
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

    def _rows(self, items: Iterable[tuple[bytes, bytes]], size: int
              ) -> tuple[np.ndarray, np.ndarray] | None:
        """(media ids, bucket rows) of index items whose key ends with the media id."""
        pairs = list(items)
        if not pairs:
            return None
        media = np.frombuffer(b"".join([key[-8:] for key, _ in pairs]), ">u8").astype(np.int64)
        blob = b"".join([v for _, v in pairs])
        if size == k.HOUR:
            rows = np.frombuffer(blob, k.HOUR_ROW)["hour"]
        else:
            rows = np.frombuffer(blob, "<i8").reshape(len(pairs), k.BUCKET_FIELDS)
        return media, rows

    def _minute_rows(self, partition: int, low: int, high: int
                     ) -> tuple[np.ndarray, np.ndarray] | None:
        """Sums of the minutes in [low, high) per media item, from the hour index rows."""
        prefix = k.rank_prefix(partition, k.HOUR)
        items = list(self.store.scan(prefix + k.biased(floor_to(low, k.HOUR)),
                                     prefix + k.biased(ceil_to(high, k.HOUR))))
        if not items:
            return None
        rows = np.frombuffer(b"".join([v for _, v in items]), k.HOUR_ROW)
        hours = np.frombuffer(b"".join([key[3:11] for key, _ in items]), ">u8"
                              ).astype(np.uint64) ^ np.uint64(k.BIAS)
        minute = hours.astype(np.int64)[:, None] + k.MINUTE * np.arange(60)[None, :]
        inside = (minute >= low) & (minute < high)
        sums = (rows["minutes"].astype(np.int64) * inside[:, :, None]).sum(axis=1)
        media = np.frombuffer(b"".join([key[-8:] for key, _ in items]), ">u8").astype(np.int64)
        active = sums[:, 4] > 0
        return media[active], sums[active]

    def range_viewers_all(self, partitions: Sequence[int], start: int, end: int
                          ) -> dict[int, int]:
        """Media -> exact distinct users over minute-aligned [start, end), from the
        day-major bitmaps (cost: one row per viewer-day in the range)."""
        users: dict[bytes, set[bytes]] = {}
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        for p in partitions:
            prefix = k.presence_by_day_prefix(p)
            masks: dict[bytes, int | None] = {}
            for key, bitmap in self.store.scan(prefix + k.biased(first_day),
                                               prefix + k.biased(end_day)):
                day_bytes = key[3:11]
                if day_bytes not in masks:
                    masks[day_bytes] = _day_mask(k.unbiased(day_bytes), start, end)
                mask = masks[day_bytes]
                if mask is None or int.from_bytes(bitmap, "little") & mask:
                    media = key[11:19]
                    found = users.get(media)
                    if found is None:
                        users[media] = found = set()
                    found.add(key[19:27])
        return {int.from_bytes(m, "big"): len(u) for m, u in users.items()}

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


def _day_mask(day: int, start: int, end: int) -> int | None:
    """Minutes of `day` inside [start, end); None when the whole day is inside."""
    if start <= day and day + k.DAY <= end:
        return None
    return minute_mask((start - day) // k.MINUTE, (end - day) // k.MINUTE)

