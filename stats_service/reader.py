"""Reading the stats state for queries: sums over partitions of the rows in keys.py.

Every read goes to RocksDB (its block cache bounds memory), so nothing here needs locking
against the consumer thread. A query's reads are not one snapshot: a batch committed between
two of them may show in one and not the other (rocksdict's snapshot iterators do not honour
the snapshot, so they are not used).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from stats_service import key_layout as k
from stats_service.aggregation import minute_mask
from stats_service.request_parsing import ceil_to, floor_to, tiles
from viewevents.state.keys import partition_prefix, prefix_end
from viewevents.state.store import StateStore

DEFAULT_CHUNK_ROWS = 20_000
VIEWER_ROWS = 8_192  # viewer-day rows of one item decoded at once (bounds a query's temporaries)
_NO_MEDIA = bytes(8)


@dataclass(frozen=True)
class _Stream:
    """One run of index rows sorted by the key bytes after `prefix` (media id, or media id
    then user id): a day's or hour's ranking rows ("bucket"), an hour whose minutes in
    [low, high) are summed ("minutes"), or a day's bitmaps ("presence")."""

    prefix: bytes
    kind: str
    partition: int
    start: int  # the bucket's (hour's, day's) start
    low: int = 0
    high: int = 0


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

    def __init__(self, store: StateStore, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.store = store
        self.chunk_rows = max(1, chunk_rows)  # about the most index rows a ranking holds

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
            view_time=sum(r[0] for r in rows),
            starts=sum(r[1] for r in rows),
            stops=sum(r[2] for r in rows),
            ends=sum(r[3] for r in rows),
            uniques=sum(r[4] for r in rows),
            first=min(r[5] for r in rows),
            last=max(r[6] for r in rows),
        )

    def trend(
        self, partitions: Sequence[int], media_id: int, size: int, start: int, end: int
    ) -> dict[int, list[int]]:
        """Bucket start -> [view_time, starts, stops, ends, uniques] for [start, end)."""
        buckets: dict[int, list[int]] = {}
        for p in partitions:
            if size == k.DAY:
                prefix = k.bucket_prefix(p, k.DAY, media_id)
                for key, value in self.store.scan(prefix + k.biased(start), prefix + k.biased(end)):
                    _add(buckets, k.unbiased(k.last_column(key)), k.decode_bucket(value))
                continue
            prefix = k.bucket_prefix(p, k.HOUR, media_id)
            items = list(
                self.store.scan(
                    prefix + k.biased(floor_to(start, k.HOUR)),
                    prefix + k.biased(ceil_to(end, k.HOUR)),
                )
            )
            if not items:
                continue
            rows, _ = k.hour_rows_and_pruned([v for _, v in items])  # pruned: no minutes
            hours = [k.unbiased(k.last_column(key)) for key, _ in items]
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
        """Exact distinct users with an event on the item in minute-aligned [start, end). A
        partition with few viewer-days of the item is read with a plain loop (numpy's fixed
        cost per call is most of the time there: a ranking's page asks this per item). Days
        wholly inside the range are read as keys alone: their minute sets cannot exclude a
        row, and not building a value per row cuts the read by about a third (a 30-day page
        reads tens of thousands of viewer-days per item)."""
        users: list[np.ndarray] = []
        few: set[bytes] = set()
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        whole_from, whole_to = ceil_to(start, k.DAY), floor_to(end, k.DAY)
        if whole_from >= whole_to:  # no whole day: every day is an edge day
            whole_from = whole_to = end_day
        for p in partitions:
            prefix = k.presence_prefix(p, media_id)
            for low, high in ((first_day, whole_from), (whole_to, end_day)):
                if low < high:
                    rows = self.store.scan(prefix + k.biased(low), prefix + k.biased(high))
                    _edge_users(rows, start, end, users, few)
            if whole_from < whole_to:
                keys = self.store.scan_keys(
                    prefix + k.biased(whole_from), prefix + k.biased(whole_to)
                )
                while chunk := list(islice(keys, VIEWER_ROWS)):
                    if len(chunk) <= FEW_ROWS:
                        few.update(key[_USER_AT : _USER_AT + k.COLUMN_BYTES] for key in chunk)
                    else:
                        users.append(k.key_columns(chunk, 2))  # P media day user
        if not users:
            return len(few)
        if few:
            users.append(np.frombuffer(b"".join(few), ">u8").astype(np.int64))
        return len(np.unique(np.concatenate(users)))

    # --- every media item in a range (ListTopMedia) -------------------------------------------

    def range_counts(
        self, partitions: Sequence[int], start: int, end: int
    ) -> dict[int, tuple[int, int]]:
        """Media -> (view_time, starts) over minute-aligned [start, end), for every media item
        with an event there (all chunks gathered: for tests and small ranges)."""
        return {
            m: (v, s)
            for media, values in self.range_chunks(partitions, start, end, False)
            for m, v, s in zip(media.tolist(), values[:, 0].tolist(), values[:, 1].tolist())
        }

    def range_viewers_all(self, partitions: Sequence[int], start: int, end: int) -> dict[int, int]:
        """Media -> exact distinct users over minute-aligned [start, end) (all chunks)."""
        return {
            m: u
            for media, values in self.range_chunks(partitions, start, end, True)
            for m, u in zip(media.tolist(), values[:, 2].tolist())
        }

    def range_chunks(
        self, partitions: Sequence[int], start: int, end: int, viewers: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every media item with an event in minute-aligned [start, end), in chunks of
        ascending media ids: (media ids, rows of view_time, starts, unique viewers (0 unless
        `viewers`)). Whole days, whole hours and the minutes at the ragged edges come from the
        bucket-major index rows, merged across buckets by media id about `chunk_rows` rows at
        a time, so memory does not grow with the number of media in the range."""
        streams = self._count_streams(partitions, start, end)
        presence = self._presence_streams(partitions, start, end) if viewers else []
        for lo, hi, parts in self._merge(streams, _NO_MEDIA, None, 8):
            media_parts, value_parts = [], []
            for stream, items in parts:
                found = (
                    self._minute_items(stream, items)
                    if stream.kind == "minutes"
                    else self._rows(items)
                )
                if found is not None and len(found[0]):
                    media_parts.append(found[0])
                    value_parts.append(found[1])
            if not media_parts:
                continue
            media, index = np.unique(np.concatenate(media_parts), return_inverse=True)
            rows = np.concatenate(value_parts)
            values = np.zeros((len(media), 3), np.int64)
            values[:, 0] = np.bincount(index, weights=rows[:, 0], minlength=len(media))
            values[:, 1] = np.bincount(index, weights=rows[:, 1], minlength=len(media))
            if presence:
                self._add_viewers(presence, lo, hi, start, end, media, values)
            yield media, values

    def _merge(
        self, streams: Sequence[_Stream], lo: bytes, end: bytes | None, width: int
    ) -> Iterator[tuple[bytes, bytes | None, list[tuple[_Stream, list]]]]:
        """The streams' rows in chunks [lo, hi) of the `width` key bytes after their prefixes
        (up to `end`, None: no end), each chunk complete in every stream and about
        `chunk_rows` rows in all: a stream gives at most its share of rows, and when it has
        more the chunk ends before its next row. Yields (lo, hi, [(stream, items)])."""
        share = max(1, self.chunk_rows // max(1, len(streams)))
        while streams:
            hi = end
            parts: list[tuple[_Stream, list]] = []
            for stream in streams:
                upper = prefix_end(stream.prefix) if hi is None else stream.prefix + hi
                items = list(islice(self.store.scan(stream.prefix + lo, upper), share + 1))
                if len(items) > share:
                    hi = items[share][0][-width:]  # > lo: suffixes are unique in a stream
                    items = items[:share]
                parts.append((stream, items))
            if hi is not None and hi != end:  # streams read before the chunk shrank
                parts = [(s, [it for it in items if it[0][-width:] < hi]) for s, items in parts]
            yield lo, hi, parts
            if hi is None or hi == end:
                return
            lo = hi

    def _count_streams(self, partitions: Sequence[int], start: int, end: int) -> list[_Stream]:
        """The non-empty buckets of the range's tiles, one stream each (one seek per bucket;
        minute runs read the hour index rows of the hours around them)."""
        streams: list[_Stream] = []
        for size, low, high in tiles(start, end):
            step = k.HOUR if size == k.MINUTE else size
            first, last = floor_to(low, step), ceil_to(high, step)
            for p in partitions:
                prefix = k.rank_prefix(p, step)
                for bucket in self._buckets(prefix, first, last, step):
                    if size == k.MINUTE:
                        streams.append(
                            _Stream(
                                prefix + k.biased(bucket),
                                "minutes",
                                p,
                                bucket,
                                max(low, bucket),
                                min(high, bucket + k.HOUR),
                            )
                        )
                    else:
                        streams.append(_Stream(prefix + k.biased(bucket), "bucket", p, bucket))
        return streams

    def _presence_streams(self, partitions: Sequence[int], start: int, end: int) -> list[_Stream]:
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        return [
            _Stream(k.presence_by_day_prefix(p) + k.biased(day), "presence", p, day)
            for p in partitions
            for day in self._buckets(k.presence_by_day_prefix(p), first_day, end_day, k.DAY)
        ]

    def _buckets(self, prefix: bytes, low: int, high: int, step: int) -> list[int]:
        """Starts of the buckets in [low, high) with rows under prefix + biased(start)."""
        found: list[int] = []
        at = low
        while at < high:
            first = next(
                iter(self.store.scan(prefix + k.biased(at), prefix + k.biased(high))), None
            )
            if first is None:
                break
            bucket = k.unbiased(first[0][len(prefix) : len(prefix) + 8])
            found.append(bucket)
            at = bucket + step
        return found

    def _minute_items(
        self, stream: _Stream, items: list[tuple[bytes, bytes]]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Sums of the minutes in [stream.low, stream.high) per media item of `items` (hour
        index rows): one multi-get fetches their hour rows."""
        if not items:
            return None
        row_keys = [k.hour_row_key_of_rank_key(stream.partition, key) for key, _ in items]
        rows, pruned = k.hour_rows_and_pruned(self.store.get_many(row_keys))
        minute = stream.start + k.MINUTE * np.arange(60)
        inside = (minute >= stream.low) & (minute < stream.high)
        sums = (rows["minutes"].astype(np.int64) * inside[None, :, None]).sum(axis=1)
        sums[pruned] = rows["hour"][pruned]  # minutes pruned: the range rounded to the hour
        media = k.key_columns([key for key, _ in items], 1)  # h hour media
        active = sums[:, 4] > 0
        return media[active], sums[active]

    def _add_viewers(
        self,
        streams: Sequence[_Stream],
        lo: bytes,
        hi: bytes | None,
        start: int,
        end: int,
        media: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Add to values[:, 2] the distinct users of each media item in [lo, hi), from the
        day-major bitmaps in (media, user) chunks: a (media, user) pair falls in exactly one
        chunk, so the chunks' distinct counts add up exactly."""
        end_key = None if hi is None else hi + _NO_MEDIA
        for _, _, parts in self._merge(streams, lo + _NO_MEDIA, end_key, 16):
            pairs = []
            for stream, items in parts:
                if not items:
                    continue
                keys = [key for key, _ in items]  # Q day media user
                days = np.full(len(items), stream.start, np.int64)
                inside = _in_range(days, [v for _, v in items], start, end)
                pairs.append(
                    np.stack(
                        [k.key_columns(keys, 1)[inside], k.key_columns(keys, 2)[inside]], axis=1
                    )
                )
            if not pairs:
                continue
            unique = np.unique(np.concatenate(pairs), axis=0)
            found, counts = np.unique(unique[:, 0], return_counts=True)
            at = np.minimum(np.searchsorted(media, found), len(media) - 1)
            known = media[at] == found
            np.add.at(values[:, 2], at[known], counts[known])

    def _rows(self, items: Iterable[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray] | None:
        """(media ids, bucket rows) of index items whose key ends with the media id."""
        pairs = list(items)
        if not pairs:
            return None
        media = k.key_columns([key for key, _ in pairs], 1)  # h hour media, d day media
        rows = np.frombuffer(b"".join([v for _, v in pairs]), "<i8").reshape(
            len(pairs), k.BUCKET_FIELDS
        )
        return media, rows

    def range_viewers_of(
        self, partitions: Sequence[int], media_ids: Iterable[int], start: int, end: int
    ) -> dict[int, int]:
        return {m: self.viewers(partitions, m, start, end) for m in media_ids}


def _add(buckets: dict[int, list[int]], start: int, row: Sequence[int]) -> None:
    have = buckets.get(start)
    if have is None:
        buckets[start] = list(row)
    else:
        for i in range(k.BUCKET_FIELDS):
            have[i] += row[i]


FEW_ROWS = 256  # viewer-days of one item and partition read without numpy
_DAY_AT, _USER_AT = k.column_offset(1), k.column_offset(2)  # in a P key: media day user


def _edge_users(
    rows: Iterator[tuple[bytes, bytes]],
    start: int,
    end: int,
    users: list[np.ndarray],
    few: set[bytes],
) -> None:
    """The users of P rows (days partly inside [start, end)) with a minute inside: few rows
    row by row into `few`, more VIEWER_ROWS at a time into `users` (only a chunk's Python
    bytes objects live at once, about 300 bytes a row; the rest is 8 bytes a row of ids)."""
    chunk = list(islice(rows, VIEWER_ROWS))
    if len(chunk) <= FEW_ROWS and len(chunk) < VIEWER_ROWS:  # all of them, and few
        few.update(users_in_range(chunk, start, end))
        return
    while chunk:
        keys, values = zip(*chunk)  # P media day user
        matrix = k.key_matrix(keys)
        inside = _in_range(k.time_column(matrix, 1), values, start, end)
        users.append(k.matrix_column(matrix, 2)[inside])
        chunk = list(islice(rows, VIEWER_ROWS))


def users_in_range(items: Sequence[tuple[bytes, bytes]], start: int, end: int) -> set[bytes]:
    """The user columns (8 key bytes) of P rows (key, minute set in any stored form) with a
    minute inside minute-aligned [start, end); a pruned day's 3-byte hour mask counts every minute of its
    hours (as `key_layout.minute_bitmaps`). The same answer as `_in_range`, row by row."""
    masks: dict[bytes, tuple[int, int] | None] = {}
    found: set[bytes] = set()
    for key, value in items:
        day_bytes = key[_DAY_AT : _DAY_AT + k.COLUMN_BYTES]
        if day_bytes in masks:
            mask = masks[day_bytes]
        else:
            mask = masks[day_bytes] = _row_masks(
                int.from_bytes(day_bytes, "big") - k.BIAS, start, end
            )
        if mask is not None:
            if len(value) == k.HOUR_MASK_BYTES:
                hit = int.from_bytes(value, "little") & mask[1]
            else:
                hit = k.minute_set(value) & mask[0]
            if not hit:
                continue
        found.add(key[_USER_AT : _USER_AT + k.COLUMN_BYTES])
    return found


def _row_masks(day: int, start: int, end: int) -> tuple[int, int] | None:
    """(minutes, hours) of `day` inside [start, end) as a minute bitmap and the mask of the
    hours that have such a minute; None when the whole day is inside."""
    minutes = _day_mask(day, start, end)
    if minutes is None:
        return None
    hours = sum(1 << h for h in range(24) if (minutes >> (60 * h)) & _HOUR_OF_MINUTES)
    return minutes, hours


_HOUR_OF_MINUTES = (1 << 60) - 1


def _in_range(days: np.ndarray, bitmaps: Sequence[bytes], start: int, end: int) -> np.ndarray:
    """Which viewer-day bitmaps have a minute inside [start, end): rows of days wholly inside
    are in; the others are tested 32 bits at a time against their day's minute mask (one pass
    over the rows, a mask per distinct day looked up by index)."""
    inside = np.ones(len(days), bool)
    partial = np.flatnonzero((days < start) | (days + k.DAY > end))
    if not len(partial):
        return inside
    if len(partial) == len(days):  # typical (a range cut inside its days): no per-row selection
        bits = k.minute_bitmaps(bitmaps)
        cut = days
    else:
        bits = k.minute_bitmaps([bitmaps[i] for i in partial.tolist()])
        cut = days[partial]
    distinct, which = np.unique(cut, return_inverse=True)
    masks = np.stack(
        [
            np.frombuffer(
                (_day_mask(day, start, end) or 0).to_bytes(k.BITMAP_BYTES, "little"), "<u4"
            )
            for day in distinct.tolist()
        ]
    )
    words = np.ascontiguousarray(bits).view("<u4")  # (rows, 45): 1440 bits as 32-bit words
    inside[partial] = (words & masks[which.reshape(-1)]).any(axis=1)
    return inside


def _day_mask(day: int, start: int, end: int) -> int | None:
    """Minutes of `day` inside [start, end); None when the whole day is inside."""
    if start <= day and day + k.DAY <= end:
        return None
    return minute_mask((start - day) // k.MINUTE, (end - day) // k.MINUTE)
