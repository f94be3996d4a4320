"""Per-bucket rollups of the ranking index, held in memory so that ListTopMedia over any range
reads a bounded number of cached entries instead of every index row of the range.

A rollup is one (partition, hour or day) bucket with all of its media as columns: the ranking
index rows (`h`, `d`) of the bucket, read with one scan. A day's viewer rows (from the
day-major bitmaps `Q`, reduced to a 24-bit mask of the hours in which the user had an event and
60-bit minute masks of those hours) are rollups too. Entries are built on first use and
kept in a least-recently-used cache under a byte budget.

Freshness: the processor notes which (partition, hour) and (partition, day) buckets a batch
touched and bumps their versions only after the batch is committed (`BucketVersions`). A reader
takes the version *before* reading the state and files the entry under it; an entry is used
only while its version is current. So an entry is never older than the version says: at worst
a batch committed during the load makes the entry stale at once, and the next query reloads
it. In steady state only the live hour and day change, so most reads come from the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stats_service import key_layout as k

HOUR_BITS = np.left_shift(np.uint32(1), np.arange(24, dtype=np.uint32))


class BucketVersions:
    """Change counters per (partition, bucket size, bucket start), shared by the processor
    (consumer thread) and the readers (query threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[int, int, int], int] = {}
        self._pending: set[tuple[int, int, int]] = set()

    def touch(self, partition: int, size: int, starts: np.ndarray) -> None:
        """A batch being applied changes these buckets (published by `publish`)."""
        if len(starts) == 0:
            return
        keys = [(partition, size, s) for s in np.unique(starts).tolist()]
        with self._lock:
            self._pending.update(keys)

    def publish(self) -> None:
        """The batch is committed: its buckets' cached rollups are stale from now on. (If a
        commit failed, its buckets are published with the next one: a reload too many.)"""
        with self._lock:
            for key in self._pending:
                self._versions[key] = self._versions.get(key, 0) + 1
            self._pending.clear()

    def version(self, partition: int, size: int, start: int) -> int:
        with self._lock:
            return self._versions.get((partition, size, start), 0)


class MediaSlots:
    """A dense slot per media id ever seen in a rollup (ids are only added), so that sums over
    many rollups are one `np.bincount` instead of a sort of all their rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sorted = np.zeros(0, np.int64)  # known ids, ascending
        self._slot_of_sorted = np.zeros(0, np.int64)
        self.ids = np.zeros(0, np.int64)  # slot -> media id

    def __len__(self) -> int:
        return len(self.ids)

    def slots(self, media: np.ndarray) -> np.ndarray:
        """Slots of `media` (any order), allocating slots for new ids."""
        with self._lock:
            at = np.searchsorted(self._sorted, media)
            known = at < len(self._sorted)
            known[known] = self._sorted[at[known]] == media[known]
            if not known.all():
                new = np.unique(media[~known])
                ids = np.concatenate([self.ids, new])
                order = np.argsort(ids, kind="stable")
                self._sorted, self._slot_of_sorted, self.ids = ids[order], order, ids
                at = np.searchsorted(self._sorted, media)
            return np.asarray(self._slot_of_sorted[at], np.int64)


@dataclass(frozen=True)
class BucketRollup:
    """All media of one bucket: dense slots and rows of view_time, starts, unique viewers."""

    slots: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.slots.nbytes + self.values.nbytes)


@dataclass(frozen=True)
class DayViewers:
    """One day's viewer-days sorted by (media, user), with the hours of the day (bit h) in
    which the user had an event on the item, and for each (row, hour) with events the minutes
    of that hour (`minute_key` = row * 24 + hour, ascending; `minute_bits` bit m = minute m):
    a range's ragged edge hours are then checked without reading the bitmaps again."""

    media: np.ndarray
    user: np.ndarray
    hours: np.ndarray
    minute_key: np.ndarray
    minute_bits: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(
            self.media.nbytes
            + self.user.nbytes
            + self.hours.nbytes
            + self.minute_key.nbytes
            + self.minute_bits.nbytes
        )

    def active(self, rows: np.ndarray, hour: int, minutes: int) -> np.ndarray:
        """Which `rows` had an event in one of `minutes` (a 60-bit mask) of `hour`."""
        codes = rows * 24 + hour
        at = np.minimum(np.searchsorted(self.minute_key, codes), len(self.minute_key) - 1)
        if len(self.minute_key) == 0:
            return np.zeros(len(rows), bool)
        found = self.minute_key[at] == codes
        return np.asarray(found & ((self.minute_bits[at] & np.uint64(minutes)) != 0))


Entry = BucketRollup | DayViewers


class RollupCache:
    """Least-recently-used rollups under a byte budget, each filed under its bucket version."""

    def __init__(self, versions: BucketVersions, budget_bytes: int) -> None:
        self.versions = versions
        self.budget = max(0, budget_bytes)
        self.media = MediaSlots()
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int, int, int], tuple[int, Entry]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.loads = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def current(self, kind: str, partition: int, size: int, start: int) -> bool:
        """Whether the bucket's rollup is cached under its current version (no reload)."""
        version = self.versions.version(partition, size, start)
        with self._lock:
            found = self._entries.get((kind, partition, size, start))
            return found is not None and found[0] == version

    def get(
        self, kind: str, partition: int, size: int, start: int, load: Callable[[], Entry]
    ) -> Entry:
        """The current rollup of a bucket: cached, or loaded (the version is read first)."""
        key = (kind, partition, size, start)
        version = self.versions.version(partition, size, start)
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found[0] == version:
                self._entries.move_to_end(key)
                self.hits += 1
                return found[1]
        entry = load()
        with self._lock:
            self.loads += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            if entry.nbytes <= self.budget:
                self._entries[key] = (version, entry)
                self._bytes += entry.nbytes
            while self._bytes > self.budget and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
        return entry


# --- pure helpers -----------------------------------------------------------------------------


VIEWER_CHUNK = 16_384  # viewer rows decoded at once: bounds a day rollup's build temporaries
_MINUTES_OF_HOUR = np.uint64((1 << 60) - 1)


def hour_words(bitmaps: np.ndarray) -> np.ndarray:
    """(n, 180) uint8 1440-bit minute bitmaps (bit m = minute m, little-endian) as (n, 24)
    uint64 minute masks, one per hour (bit m = minute m of the hour). Two hours are 120 bits,
    15 whole bytes: padded to two 64-bit words, the even hour is the low word's 60 bits and the
    odd hour the rest. About 400 bytes per row of temporaries (a bit per byte would be 1,440)."""
    count = len(bitmaps)
    pairs = np.zeros((count, 12, 16), np.uint8)
    pairs[:, :, :15] = bitmaps.reshape(count, 12, 15)
    words = pairs.view("<u8")  # (count, 12, 2): low and high word of each pair of hours
    low, high = words[:, :, 0], words[:, :, 1]
    out = np.empty((count, 24), np.uint64)
    out[:, 0::2] = low & _MINUTES_OF_HOUR
    out[:, 1::2] = ((low >> np.uint64(60)) | (high << np.uint64(4))) & _MINUTES_OF_HOUR
    return out


def day_viewers(media: np.ndarray, user: np.ndarray, bitmaps: Sequence[bytes]) -> DayViewers:
    """A day's viewer rows from their 1440-bit minute bitmaps: 24-bit hour masks, and the
    60-bit minute masks of each (row, hour) with events (decoded VIEWER_CHUNK rows at a time)."""
    parts = [
        _day_viewers_chunk(
            media[at : at + VIEWER_CHUNK],
            user[at : at + VIEWER_CHUNK],
            bitmaps[at : at + VIEWER_CHUNK],
        )
        for at in range(0, len(bitmaps), VIEWER_CHUNK)
    ]
    return concat_day_viewers(parts)


def _day_viewers_chunk(media: np.ndarray, user: np.ndarray, bitmaps: Sequence[bytes]) -> DayViewers:
    words = hour_words(k.minute_bitmaps(bitmaps)).reshape(-1)  # index = row * 24 + hour
    keys = np.flatnonzero(words)  # ascending
    any_hour = (words != 0).reshape(len(bitmaps), 24)
    hours = np.asarray(any_hour.astype(np.uint32) @ HOUR_BITS, np.uint32)
    return DayViewers(media, user, hours, keys.astype(np.int64), words[keys])


def concat_day_viewers(parts: Sequence[DayViewers]) -> DayViewers:
    """Consecutive chunks of one day's rows as one DayViewers (minute keys renumbered)."""
    if len(parts) == 1:
        return parts[0]
    empty = np.zeros(0, np.int64)
    if not parts:
        return DayViewers(empty, empty, np.zeros(0, np.uint32), empty, np.zeros(0, np.uint64))
    bases = np.cumsum([0] + [len(p.media) for p in parts[:-1]]) * 24
    return DayViewers(
        np.concatenate([p.media for p in parts]),
        np.concatenate([p.user for p in parts]),
        np.concatenate([p.hours for p in parts]),
        np.concatenate([p.minute_key + base for p, base in zip(parts, bases.tolist())]),
        np.concatenate([p.minute_bits for p in parts]),
    )


def hour_mask(first_hour: int, end_hour: int) -> int:
    """Mask of the hours of a day in [first_hour, end_hour)."""
    first_hour, end_hour = max(0, first_hour), min(24, end_hour)
    if end_hour <= first_hour:
        return 0
    return ((1 << end_hour) - 1) ^ ((1 << first_hour) - 1)


def rows_of(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `sorted_ids` whose id is in `wanted` (ascending, distinct), and for each the
    position of its id in `wanted`: contiguous runs found by binary search, no scan."""
    lo = np.searchsorted(sorted_ids, wanted, "left")
    hi = np.searchsorted(sorted_ids, wanted, "right")
    lengths = hi - lo
    total = int(lengths.sum())
    if total == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    owner = np.repeat(np.arange(len(wanted)), lengths)
    run_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = np.repeat(lo, lengths) + (np.arange(total) - run_start)
    return rows, owner


_MARK_LIMIT = 1 << 24  # cells of the scratch table for distinct counts (bytes)


def distinct_per_owner(owner: np.ndarray, user: np.ndarray, owners: int) -> np.ndarray:
    """Number of distinct users per owner (0..owners-1) of (owner, user) pairs: marks in a
    scratch table when the ids are dense enough, else by sorting."""
    if len(owner) == 0:
        return np.zeros(owners, np.int64)
    low, high = int(user.min()), int(user.max())
    span = high - low + 1
    if span * owners <= _MARK_LIMIT:
        marks = np.zeros(span * owners, bool)
        marks[owner * span + (user - low)] = True
        return np.bincount(np.flatnonzero(marks) // span, minlength=owners).astype(np.int64)
    if span * owners < 1 << 62:
        codes = np.unique(owner * span + (user - low))
        return np.bincount(codes // span, minlength=owners).astype(np.int64)
    order = np.lexsort((user, owner))
    o, u = owner[order], user[order]
    first = np.ones(len(o), bool)
    first[1:] = (o[1:] != o[:-1]) | (u[1:] != u[:-1])
    return np.bincount(o[first], minlength=owners).astype(np.int64)


def top_slots(values: np.ndarray, ids: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the best `keep` of `values` (descending), ties by id ascending."""
    if keep <= 0 or len(values) == 0:
        return np.zeros(0, np.int64)
    if len(values) > 4 * keep:
        threshold = np.partition(values, len(values) - keep)[len(values) - keep]
        pool = np.flatnonzero(values >= threshold)
    else:
        pool = np.arange(len(values))
    order = np.lexsort((ids[pool], -values[pool]))[:keep]
    return np.asarray(pool[order], np.int64)
