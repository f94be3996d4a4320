"""Per-bucket rollups of the ranking index, held in memory so that ListTopMedia over any range
reads a bounded number of cached entries instead of every index row of the range.

A rollup is one (partition, hour or day) bucket with all of its media as columns: the ranking
index rows (`h`, `d`) of the bucket, read with one scan. A day's viewer rows (from the
day-major bitmaps `Q`, reduced to a 24-bit mask of the hours in which the user had an event and
60-bit minute masks of those hours) are rollups too, as are one item's viewer rows of a day
and its users of a day (from its `P` rows, for a page's viewers when whole days are too large
to keep). Entries are built on first use and kept in a least-recently-used cache under a byte
budget.

Freshness: the processor notes which (partition, hour) and (partition, day) buckets a batch
touched, and which of their keys it rewrote (the media of `h` and `d` rows, the (media, user)
of `Q` rows), and bumps their versions only after the batch is committed (`BucketVersions`,
which keeps a bounded log of the keys each version changed). A reader takes the version
*before* reading the state and files the entry under it; an entry is used only while its
version is current. A cached entry whose version is behind is brought up to date by re-reading
only the keys changed since (one multi-get) and merging them into a new entry (copy on write:
a query holding the old one keeps a consistent entry), with the version and the changed keys
read together before the state; when the log no longer reaches back to the entry's version,
the change was not described key by key (minute retention pruning a day), or many keys
changed, the entry is reloaded. So an entry is never older than the version it is filed under:
at worst a batch committed during a load or refresh makes it stale at once, and the next query
refreshes it. Under a steady stream (new events in the live hour and day, late events in older
buckets) a ranking costs about the keys changed since the previous one, not the range's rows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from stats_service import key_layout as k

HOUR_BITS = np.left_shift(np.uint32(1), np.arange(24, dtype=np.uint32))


LOG_CHUNK_COST = 8  # keys charged per logged change on top of its keys (arrays, bookkeeping)
LOG_KEY_BYTES = 16  # bytes per logged key, at most (a viewer row's media and user)
DEFAULT_LOG_KEYS = 1 << 16


@dataclass(frozen=True)
class Changes:
    """The keys of one bucket changed by some versions: media ids of its ranking rows (`h`,
    `d`), and (media, user) of its viewer rows (`Q`, days only), each sorted and distinct."""

    media: np.ndarray
    viewer_media: np.ndarray
    viewer_user: np.ndarray

    def __len__(self) -> int:
        return len(self.media) + len(self.viewer_media)


def no_changes() -> Changes:
    empty = np.zeros(0, np.int64)
    return Changes(empty, empty, empty)


class _Pending:
    """Keys one bucket's uncommitted batches changed (arrays as noted; deduplicated later)."""

    __slots__ = ("media", "viewer_media", "viewer_user")

    def __init__(self) -> None:
        self.media: list[np.ndarray] = []
        self.viewer_media: list[np.ndarray] = []
        self.viewer_user: list[np.ndarray] = []


class BucketVersions:
    """Change counters per (partition, bucket size, bucket start), shared by the processor
    (consumer thread) and the readers (query threads), with a bounded log of which keys each
    version changed, so that a cached rollup can be brought up to date by re-reading only
    those keys instead of its whole bucket (`since`).

    The log holds at most about `log_keys` keys over all buckets, oldest changes dropped
    first; a bucket whose log no longer reaches back to an entry's version (or whose change
    was not described, `touch`) is reloaded in full."""

    def __init__(self, log_keys: int = DEFAULT_LOG_KEYS) -> None:
        self._lock = threading.Lock()
        self.log_keys = max(0, log_keys)
        self._versions: dict[tuple[int, int, int], int] = {}
        self._pending: dict[tuple[int, int, int], _Pending | None] = {}  # None: unknown keys
        # Per bucket: (version, its changes) in version order, complete from `_floor` on: an
        # entry at version >= floor can be brought up to date from the log.
        self._log: dict[tuple[int, int, int], deque[tuple[int, Changes]]] = {}
        self._floor: dict[tuple[int, int, int], int] = {}
        self._fifo: deque[tuple[tuple[int, int, int], int, int]] = deque()  # bucket, version, cost
        self._logged = 0

    def touch(self, partition: int, size: int, starts: np.ndarray) -> None:
        """A batch being applied changes these buckets in ways not described key by key
        (published by `publish`; their cached rollups are then reloaded in full)."""
        if len(starts) == 0:
            return
        keys = [(partition, size, s) for s in np.unique(starts).tolist()]
        with self._lock:
            for key in keys:
                self._pending[key] = None

    def note(
        self,
        partition: int,
        size: int,
        starts: np.ndarray,
        media: np.ndarray,
        user: np.ndarray | None = None,
    ) -> None:
        """A batch being applied rewrites the ranking rows (media, bucket `starts`), or with
        `user` the viewer rows (media, user, day `starts`): published by `publish`."""
        if len(starts) == 0:
            return
        if not self.log_keys:
            self.touch(partition, size, starts)
            return
        # Sorted by bucket, then media (and user), duplicates dropped, in one pass for all
        # buckets: each bucket's keys are then sorted and distinct as they are.
        keys = (starts, media) if user is None else (starts, media, user)
        order = np.lexsort(keys[::-1])
        columns = [c[order] for c in keys]
        first = np.ones(len(order), bool)
        first[1:] = np.any([c[1:] != c[:-1] for c in columns], axis=0)
        columns = [c[first] for c in columns]
        bucket_starts = columns[0]
        cuts = np.flatnonzero(bucket_starts[1:] != bucket_starts[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(bucket_starts)]
        with self._lock:
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                key = (partition, size, int(bucket_starts[lo]))
                if key not in self._pending:
                    self._pending[key] = _Pending()
                pending = self._pending[key]
                if pending is None:
                    continue
                if user is None:
                    pending.media.append(columns[1][lo:hi])
                else:
                    pending.viewer_media.append(columns[1][lo:hi])
                    pending.viewer_user.append(columns[2][lo:hi])

    def publish(self) -> None:
        """The batch is committed: its buckets' cached rollups are stale from now on (and may
        be brought up to date from the logged keys). If a commit failed, its buckets are
        published with the next one: a refresh too many."""
        with self._lock:
            for key, pending in self._pending.items():
                version = self._versions.get(key, 0) + 1
                self._versions[key] = version
                changes = None if pending is None else _changes_of(pending)
                if changes is None or len(changes) + LOG_CHUNK_COST > self.log_keys // 4:
                    self._log.pop(key, None)
                    self._floor[key] = version
                    continue
                cost = len(changes) + LOG_CHUNK_COST
                self._log.setdefault(key, deque()).append((version, changes))
                self._fifo.append((key, version, cost))
                self._logged += cost
            self._pending.clear()
            while self._logged > self.log_keys and self._fifo:
                key, version, cost = self._fifo.popleft()
                self._logged -= cost
                log = self._log.get(key)
                if log and log[0][0] == version:  # else already dropped with its bucket's log
                    log.popleft()
                    self._floor[key] = version
                    if not log:
                        del self._log[key]

    @property
    def bytes(self) -> int:
        """About the memory the change log holds (at most `log_keys` x LOG_KEY_BYTES)."""
        return self._logged * LOG_KEY_BYTES

    def version(self, partition: int, size: int, start: int) -> int:
        with self._lock:
            return self._versions.get((partition, size, start), 0)

    def version_sum(self, parts: Sequence[tuple[int, int, int]]) -> int:
        with self._lock:
            return sum(self._versions.get(part, 0) for part in parts)

    def changed_keys(
        self, partition: int, size: int, start: int, version: int, viewers: bool
    ) -> int | None:
        """At most how many ranking rows (or with `viewers`, viewer rows) changed after
        `version` (None: not known any more): whether a refresh would pay, without collecting
        them."""
        key = (partition, size, start)
        with self._lock:
            current = self._versions.get(key, 0)
            if version > current or version < self._floor.get(key, 0):
                return None
            chunks = [c for v, c in self._log.get(key, ()) if v > version]
        return sum(len(c.viewer_media) if viewers else len(c.media) for c in chunks)

    def since(
        self,
        partition: int,
        size: int,
        start: int,
        version: int,
        narrow: Callable[[Changes], Changes] | None = None,
    ) -> tuple[int, Changes | None]:
        """The bucket's current version and the keys changed after `version` (None: not
        known any more, reload in full), only those `narrow` keeps. Read together under the
        lock, *before* the caller reads the state: the keys re-read then are at least as new as
        the version."""
        key = (partition, size, start)
        with self._lock:
            current = self._versions.get(key, 0)
            if version == current:
                return current, no_changes()
            if version > current or version < self._floor.get(key, 0):
                return current, None
            chunks = [c for v, c in self._log.get(key, ()) if v > version]
        if narrow is not None:  # each version's keys are sorted: narrowing them is cheap
            chunks = [narrow(c) for c in chunks]
        return current, _merged(chunks)


def _changes_of(pending: _Pending) -> Changes:
    """One version's changes: the noted keys, sorted and distinct (each noted array already
    is: only several notes of one bucket, a failed commit's and the next, need merging)."""
    empty = np.zeros(0, np.int64)
    media = pending.media[0] if len(pending.media) == 1 else empty
    if len(pending.media) > 1:
        media = np.unique(np.concatenate(pending.media))
    if not pending.viewer_media:
        return Changes(media, empty, empty)
    if len(pending.viewer_media) == 1:
        return Changes(media, pending.viewer_media[0], pending.viewer_user[0])
    viewer_media, viewer_user = _unique_pairs(
        np.concatenate(pending.viewer_media), np.concatenate(pending.viewer_user)
    )
    return Changes(media, viewer_media, viewer_user)


def _merged(chunks: Sequence[Changes]) -> Changes:
    """The union of several versions' changes."""
    if len(chunks) == 1:
        return chunks[0]
    if not chunks:
        return no_changes()
    media = np.unique(np.concatenate([c.media for c in chunks]))
    viewer_media, viewer_user = _unique_pairs(
        np.concatenate([c.viewer_media for c in chunks]),
        np.concatenate([c.viewer_user for c in chunks]),
    )
    return Changes(media, viewer_media, viewer_user)


def _unique_pairs(media: np.ndarray, user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (media, user) pairs sorted by media, then user."""
    if len(media) == 0:
        return media.astype(np.int64), user.astype(np.int64)
    order = np.lexsort((user, media))
    m, u = media[order], user[order]
    first = np.ones(len(m), bool)
    first[1:] = (m[1:] != m[:-1]) | (u[1:] != u[:-1])
    return m[first].astype(np.int64), u[first].astype(np.int64)


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
    """All media of one bucket: dense slots and rows of view_time, starts, unique viewers.
    Made by `bucket_rollup`, which stores them as int32 when they fit."""

    slots: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.slots.nbytes + self.values.nbytes)

    @property
    def rows(self) -> int:
        return len(self.slots)


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

    @property
    def rows(self) -> int:
        return len(self.media)

    def active(self, rows: np.ndarray, hour: int, minutes: int) -> np.ndarray:
        """Which `rows` had an event in one of `minutes` (a 60-bit mask) of `hour`."""
        codes = rows * 24 + hour
        at = np.minimum(np.searchsorted(self.minute_key, codes), len(self.minute_key) - 1)
        if len(self.minute_key) == 0:
            return np.zeros(len(rows), bool)
        found = self.minute_key[at] == codes
        return np.asarray(found & ((self.minute_bits[at] & np.uint64(minutes)) != 0))


def find_pairs(
    media: np.ndarray, user: np.ndarray, want_media: np.ndarray, want_user: np.ndarray
) -> np.ndarray:
    """Row of each wanted (media, user) in rows sorted by (media, user), -1 where absent: a
    binary search for the media's run, then one over users inside the runs, all pairs at once
    (about log2(run length) vectorised steps; nothing proportional to the rows)."""
    if len(media) and media[0] == media[-1]:  # one item's rows: users alone are sorted
        at = np.searchsorted(user, want_user)
        ok = (want_media == media[0]) & (at < len(user))
        ok[ok] = user[at[ok]] == want_user[ok]
        return np.where(ok, at, -1)
    lo = np.searchsorted(media, want_media, "left")
    hi = np.searchsorted(media, want_media, "right")
    end = hi.copy()
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) // 2
        right = open_ & (user[np.minimum(mid, len(user) - 1)] < want_user)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(open_ & ~right, mid, hi)
    found = lo < end
    found[found] = user[lo[found]] == want_user[found]
    return np.where(found, lo, -1)


COMPACT_SHARE = 8  # a day's changed rows beyond an eighth of its base: merged into a new base
COMPACT_MIN_ROWS = 1024  # (and beyond this many)


@dataclass(frozen=True)
class DayLayers:
    """A day's viewer rollup as refreshed: `base` (as loaded), which of its rows are `dead`
    (rewritten since, or gone; None: none), and `delta`, the current rows of every pair changed
    since the base (sorted). A refresh only searches the changed pairs in the base and merges
    them into the small delta (copy on write, nothing proportional to the day); once the delta
    outgrows an eighth of the base, both are merged into a new base."""

    base: DayViewers
    dead: np.ndarray | None
    delta: DayViewers

    @property
    def nbytes(self) -> int:
        dead = 0 if self.dead is None else self.dead.nbytes
        return self.base.nbytes + dead + self.delta.nbytes

    @property
    def rows(self) -> int:
        return self.base.rows

    def layers(self) -> list[tuple[DayViewers, np.ndarray | None]]:
        """(rows, which of them are dead or None for none) to read, base first."""
        return [(self.base, self.dead), (self.delta, None)]


def empty_day_viewers() -> DayViewers:
    empty = np.zeros(0, np.int64)
    return DayViewers(empty, empty, np.zeros(0, np.uint32), empty, np.zeros(0, np.uint64))


def day_layers(base: DayViewers) -> DayLayers:
    return DayLayers(base, None, empty_day_viewers())


def refreshed_day(
    entry: DayLayers, media: np.ndarray, user: np.ndarray, fresh: DayViewers
) -> DayLayers:
    """`entry` with the changed (media, user) pairs (sorted, distinct) now as in `fresh` (their
    stored rows re-read, sorted; a pair no longer stored has none)."""
    at = find_pairs(entry.base.media, entry.base.user, media, user)
    dead = entry.dead
    hit = at[at >= 0]
    if len(hit):
        dead = np.zeros(entry.base.rows, bool) if dead is None else dead.copy()
        dead[hit] = True
    delta = updated_day_viewers(entry.delta, media, user, fresh)
    if len(delta.media) * COMPACT_SHARE <= max(entry.base.rows, COMPACT_MIN_ROWS):
        return DayLayers(entry.base, dead, delta)
    keep = np.ones(entry.base.rows, bool) if dead is None else ~dead
    return day_layers(merge_day_rows(entry.base, keep, delta))


@dataclass(frozen=True)
class ItemUsers:
    """One item's viewers of one whole day in one partition (its `P` keys' users, sorted):
    what a page's viewers need of a day wholly inside a long range, where the hours and
    minutes of `DayViewers` cannot exclude anyone. Charged a fixed overhead per entry too:
    a page of a 30-day range keeps over a thousand of them, most a few hundred bytes."""

    users: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.users.nbytes) + ITEM_ENTRY_OVERHEAD

    @property
    def rows(self) -> int:
        return len(self.users)


ITEM_ENTRY_OVERHEAD = 400  # bytes of an entry beyond its array: key, tuples, array header


def updated_item_users(entry: ItemUsers, changed: np.ndarray, stored: np.ndarray) -> ItemUsers:
    """`entry` with the `changed` users (sorted, distinct) now in it exactly where `stored`."""
    kept = np.setdiff1d(entry.users, changed[~stored], assume_unique=True)
    return ItemUsers(np.union1d(kept, changed[stored]))


Entry = BucketRollup | DayLayers | ItemUsers


Refresh = Callable[[Entry, Changes], Entry]
Narrow = Callable[[tuple[str, int, int, int], Changes], Changes]  # an entry's key, its changes


@dataclass(frozen=True)
class Stale:
    """A cached entry behind its bucket's version, the keys changed since (narrowed to those
    it holds), and the version it is current at once they are merged in."""

    key: tuple[str, int, int, int]  # kind, partition, size, start
    entry: Entry
    changes: Changes
    version: int


REFRESH_SHARE = 4  # changed keys up to a quarter of an entry's rows: refresh, else reload


class RollupCache:
    """Least-recently-used rollups under a byte budget, each filed under its bucket version.

    Scan-resistant: an entry used since the latest ranking began (`new_round`) is never evicted
    to make room for another; a rollup that finds no other room is used once and not kept. A
    ranking whose rollups outgrow the budget then keeps hitting the part that fits, where plain
    least-recently-used evicted each entry before its next use (every one reloaded, every call:
    the soak's rankings after the cache filled).

    A cached entry whose version is behind is brought up to date by `refresh` when the bucket's
    change log still covers it and names few keys (re-reading those keys only), else reloaded.
    Entries are never changed in place: a refresh builds a new one (copy on write), so a query
    holding the old entry keeps reading a consistent one."""

    def __init__(self, versions: BucketVersions, budget_bytes: int) -> None:
        self.versions = versions
        self.budget = max(0, budget_bytes)
        self.media = MediaSlots()
        self._lock = threading.Lock()
        # key -> (version, entry, the round it was last used in), least recently used first
        self._entries: OrderedDict[tuple[str, int, int, int], tuple[int, Entry, int]] = (
            OrderedDict()
        )
        self._bytes = 0
        self._round = 0
        self.hits = 0
        self.loads = 0
        self.refreshes = 0
        self.builds = 0  # derived entries built from others (not read from the store)

    @property
    def bytes(self) -> int:
        return self._bytes

    def counts(self) -> dict[str, int]:
        """Entries served by outcome, and the bytes held (exposed as metrics)."""
        with self._lock:
            return {
                "hit": self.hits,
                "refresh": self.refreshes,
                "load": self.loads,
                "build": self.builds,
                "bytes": self._bytes,
            }

    def new_round(self) -> None:
        """A ranking begins: entries it uses are kept over entries it loads later."""
        with self._lock:
            self._round += 1

    def current(self, kind: str, partition: int, size: int, start: int) -> bool:
        """Whether the bucket's rollup is cached under its current version (no reload)."""
        version = self.versions.version(partition, size, start)
        with self._lock:
            found = self._entries.get((kind, partition, size, start))
            return found is not None and found[0] == version

    def cheap(self, kind: str, partition: int, size: int, start: int) -> bool:
        """Whether the bucket's rollup is cached and current or can be refreshed (no reload)."""
        with self._lock:
            found = self._entries.get((kind, partition, size, start))
        if found is None:
            return False
        viewers = isinstance(found[1], (DayLayers, ItemUsers))
        changed = self.versions.changed_keys(partition, size, start, found[0], viewers)
        return changed is not None and _worth_refreshing(changed, found[1].rows)

    def get_derived(
        self,
        kind: str,
        size: int,
        start: int,
        parts: Sequence[tuple[int, int, int]],
        build: Callable[[], Entry],
    ) -> Entry:
        """An entry built from the entries of other buckets, `parts` (partition, size, start):
        current while none of them changed. Filed under the sum of their versions, which grows
        with every change to any of them (versions only grow) and is read before `build`
        reads them: like a load, never newer than it claims."""
        version = self.versions.version_sum(parts)
        key = (kind, -1, size, start)
        _, hit = self._cached(key, version)
        if hit is not None:
            return hit
        entry = build()
        with self._lock:
            self.builds += 1
        self._file(key, version, entry)
        return entry

    def file_loaded(
        self, kind: str, partition: int, size: int, start: int, version: int, entry: Entry
    ) -> None:
        """Keep a loaded entry (by `get`, or by a caller that loads several in one read) under
        the version read before reading the state."""
        with self._lock:
            self.loads += 1
        self._file((kind, partition, size, start), version, entry)

    def cached_rows(self, kind: str, partition: int, size: int, start: int) -> int | None:
        """Rows of the bucket's cached rollup, whatever its version (None: not cached)."""
        with self._lock:
            found = self._entries.get((kind, partition, size, start))
        return None if found is None else found[1].rows

    def get(
        self,
        kind: str,
        partition: int,
        size: int,
        start: int,
        load: Callable[[], Entry],
        refresh: Refresh | None = None,
        narrow: Narrow | None = None,
    ) -> Entry:
        """The current rollup of a bucket: cached, refreshed from its changed keys (those of
        them it holds: `narrow`), or loaded (the version, and the changed keys with it, are read
        before the state)."""
        key = (kind, partition, size, start)
        version = self.versions.version(partition, size, start)
        [entry] = self.refresh_all(
            [key],
            None
            if refresh is None
            else (lambda stale: [refresh(s.entry, s.changes) for s in stale]),
            narrow,
        )
        if entry is None:
            entry = load()
            self.file_loaded(kind, partition, size, start, version, entry)
        return entry

    def refresh_all(
        self,
        keys: Sequence[tuple[str, int, int, int]],
        refresh: Callable[[list[Stale]], list[Entry]] | None,
        narrow: Narrow | None = None,
    ) -> list[Entry | None]:
        """The current entries of several buckets that are cached and current or cheap to
        refresh (None for the others, which the caller loads one at a time: loads of many
        days must not all be held at once). The stale ones are brought up to date by one
        call of `refresh`, which can read all of their changed keys with one multi-get: under
        a steady stream a one-day ranking refreshes about a hundred hour rollups and its
        page's item entries, and one read and merge each was most of its time."""
        out: list[Entry | None] = []
        stale: list[Stale] = []
        at: list[int] = []
        for key in keys:
            _, partition, size, start = key
            found, hit = self._cached(key, self.versions.version(partition, size, start))
            out.append(hit)
            if hit is not None or found is None or refresh is None:
                continue
            keep = None if narrow is None else partial(narrow, key)
            current, changes = self.versions.since(partition, size, start, found[0], keep)
            if changes is None or not _worth_refreshing(len(changes), found[1].rows):
                continue
            if len(changes) == 0:  # none of the changes is in this entry
                self._file(key, current, found[1])
                out[-1] = found[1]
                with self._lock:
                    self.refreshes += 1
                continue
            stale.append(Stale(key, found[1], changes, current))
            at.append(len(out) - 1)
        if stale and refresh is not None:
            for i, item, entry in zip(at, stale, refresh(stale), strict=True):
                self._file(item.key, item.version, entry)
                out[i] = entry
            with self._lock:
                self.refreshes += len(stale)
        return out

    def _cached(
        self, key: tuple[str, int, int, int], version: int
    ) -> tuple[tuple[int, Entry, int] | None, Entry | None]:
        """What is filed under `key` (None: nothing), and its entry if it is at `version` (a
        hit: marked used)."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] != version:
                return found, None
            self._entries[key] = (version, found[1], self._round)
            self._entries.move_to_end(key)
            self.hits += 1
            return found, found[1]

    def _file(self, key: tuple[str, int, int, int], version: int, entry: Entry) -> None:
        """Keep `entry` under `version` unless a newer one was filed meanwhile."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old[0] > version:
                return
            if old is not None:
                del self._entries[key]
                self._bytes -= old[1].nbytes
            if entry.nbytes > self.budget:
                return
            while self._bytes + entry.nbytes > self.budget and self._entries:
                oldest = next(iter(self._entries.values()))
                if oldest[2] == self._round:
                    return  # everything kept is in use by the current ranking: not kept
                _, (_, dropped, _) = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
            self._entries[key] = (version, entry, self._round)
            self._bytes += entry.nbytes


def _worth_refreshing(changed: int, rows: int) -> bool:
    """Few enough changed keys that re-reading them beats reading the whole bucket again."""
    return changed * REFRESH_SHARE <= max(rows, 64)


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


def _day_viewers_chunk(media: np.ndarray, user: np.ndarray, values: Sequence[bytes]) -> DayViewers:
    """Minute lists (most rows: a viewer-day with few active minutes) are read as they are,
    without a round trip through 180-byte bitmaps; bitmaps and pruned hour masks as bitmaps."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    listed = (lengths != k.BITMAP_BYTES) & (lengths != k.HOUR_MASK_BYTES)
    if not listed.any():
        keys, words = _bitmap_minute_words(values)
    else:
        keys, words = _listed_minute_words(values, np.flatnonzero(listed), lengths)
        dense = np.flatnonzero(~listed)
        if len(dense):
            dense_keys, dense_words = _bitmap_minute_words([values[i] for i in dense.tolist()])
            row, hour = np.divmod(dense_keys, 24)
            dense_keys = dense[row] * 24 + hour  # the chunk's row numbers
            dense_at, listed_at = _interleave(dense_keys, keys)
            merged_keys = np.empty(len(keys) + len(dense_keys), np.int64)
            merged_keys[dense_at], merged_keys[listed_at] = dense_keys, keys
            merged_words = np.empty(len(merged_keys), np.uint64)
            merged_words[dense_at], merged_words[listed_at] = dense_words, words
            keys, words = merged_keys, merged_words
    row, hour = np.divmod(keys, 24)
    # One key per (row, hour): the OR of a row's hour bits is their sum (below 2**24, exact).
    weights = HOUR_BITS[hour].astype(np.float64)
    hours = np.bincount(row, weights, minlength=len(values)).astype(np.uint32)
    return DayViewers(media, user, hours, keys, words)


def _bitmap_minute_words(values: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(row * 24 + hour, its 60-bit minute mask) of every active hour, ascending, from any
    stored form through 1440-bit bitmaps."""
    words = hour_words(k.minute_bitmaps(values)).reshape(-1)  # index = row * 24 + hour
    keys = np.flatnonzero(words)  # ascending
    return keys.astype(np.int64), words[keys]


def _listed_minute_words(
    values: Sequence[bytes], listed: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The same for the rows `listed` (ascending) whose values are sorted minute lists: each
    minute's (row, hour) key and bit, OR-ed over the runs of equal keys."""
    minute = np.frombuffer(b"".join([values[i] for i in listed.tolist()]), "<u2").astype(np.int64)
    if len(minute) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    row = np.repeat(listed, lengths[listed] // 2)
    hour, bit = np.divmod(minute, 60)
    codes = row * 24 + hour  # ascending: rows ascending, minutes ascending in a row
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    bits = np.left_shift(np.uint64(1), bit.astype(np.uint64))
    return codes[first], np.bitwise_or.reduceat(bits, first)


def concat_day_viewers(parts: Sequence[DayViewers]) -> DayViewers:
    """Consecutive chunks of one day's rows as one DayViewers (minute keys renumbered)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return empty_day_viewers()
    bases = np.cumsum([0] + [len(p.media) for p in parts[:-1]]) * 24
    return DayViewers(
        np.concatenate([p.media for p in parts]),
        np.concatenate([p.user for p in parts]),
        np.concatenate([p.hours for p in parts]),
        np.concatenate([p.minute_key + base for p, base in zip(parts, bases.tolist())]),
        np.concatenate([p.minute_bits for p in parts]),
    )


def day_viewer_rows(viewers: DayViewers, low: int, high: int) -> DayViewers:
    """Rows [low, high) of a day rollup on their own (minute keys renumbered): the inverse of
    `concat_day_viewers`, for rows of several entries decoded together."""
    first, stop = np.searchsorted(viewers.minute_key, [low * 24, high * 24]).tolist()
    return DayViewers(
        viewers.media[low:high],
        viewers.user[low:high],
        viewers.hours[low:high],
        viewers.minute_key[first:stop] - low * 24,
        viewers.minute_bits[first:stop],
    )


_INT32_MAX = int(np.iinfo(np.int32).max)


def bucket_rollup(slots: np.ndarray, values: np.ndarray) -> BucketRollup:
    """A rollup of (slots, rows of view time, starts, viewers), each array as int32 when all of
    its numbers fit (exactly the same numbers), else as int64: half the bytes per row, so the
    cache holds about twice as many hour and day rollups. Readers mix both freely (numpy
    promotes to int64 when rollups are combined; sums go through int64 or exact float64)."""

    def narrow(array: np.ndarray) -> np.ndarray:
        if len(array) and -_INT32_MAX <= int(array.min()) and int(array.max()) <= _INT32_MAX:
            return array.astype(np.int32)
        return array

    return BucketRollup(narrow(slots), narrow(values))


def updated_buckets(
    entries: Sequence[BucketRollup],
    changed: Sequence[np.ndarray],
    slots: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
) -> list[BucketRollup]:
    """New entries: each of `entries` whose rows of its `changed` slots are its re-read
    (`slots`, `values`) (a changed key no longer stored has no row; rows need no order), stored
    as int32 where the numbers fit, like `bucket_rollup`. All entries at once, in a fixed
    number of numpy calls and a slice each: a ranking under a steady stream refreshes about a
    hundred hour rollups, and a dozen calls per entry were a fifth of its time."""
    count = len(entries)
    every = np.arange(count)
    old_slots = np.concatenate([e.slots for e in entries]).astype(np.int64)
    old_owner = np.repeat(every, [e.rows for e in entries])
    gone = np.concatenate(changed).astype(np.int64)
    gone_owner = np.repeat(every, [len(c) for c in changed])
    span = int(max(old_slots.max(initial=-1), gone.max(initial=-1))) + 1
    if span * count <= _MARK_LIMIT:
        marks = np.zeros(span * count, bool)
        marks[gone_owner * span + gone] = True
        keep = ~marks[old_owner * span + old_slots]
    else:
        keep = ~np.isin(old_owner * span + old_slots, gone_owner * span + gone)
    owner = np.concatenate([old_owner[keep], np.repeat(every, [len(s) for s in slots])])
    order = np.argsort(owner, kind="stable")
    all_slots = np.concatenate([old_slots[keep], *slots])[order]
    old_values = np.concatenate([e.values for e in entries]).astype(np.int64)[keep]
    all_values = np.concatenate([old_values, *values])[order]
    owner = owner[order]
    outside = ((all_values > _INT32_MAX) | (all_values < -_INT32_MAX)).any(axis=1)
    wide = np.bincount(owner[outside], minlength=count) > 0
    ends = np.cumsum(np.bincount(owner, minlength=count)).tolist()
    slot_type = np.int32 if span <= _INT32_MAX else np.int64
    out: list[BucketRollup] = []
    low = 0
    for high, is_wide in zip(ends, wide.tolist()):
        rows = all_values[low:high]
        out.append(
            BucketRollup(
                all_slots[low:high].astype(slot_type),
                rows.copy() if is_wide else rows.astype(np.int32),
            )
        )
        low = high
    return out


def _pair_codes(media: np.ndarray, user: np.ndarray) -> np.ndarray:
    """(media, user) pairs as 16-byte strings that sort like the pairs (big-endian, sign bit
    flipped), for binary searches over a day's sorted rows."""
    packed = np.empty((len(media), 2), ">u8")
    sign = np.uint64(1 << 63)
    packed[:, 0] = np.asarray(media, np.int64).view(np.uint64) ^ sign
    packed[:, 1] = np.asarray(user, np.int64).view(np.uint64) ^ sign
    return packed.view("S16")[:, 0]


def _interleave(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the elements of `a` and of `b` (each ascending, no value in both) in
    their merged ascending order. Only `b` (the few changed rows) is searched for: the
    elements of `b` before each of `a` are counted from those positions, no comparisons."""
    b_in_a = np.searchsorted(a, b)  # elements of `a` before each of `b`
    b_at = b_in_a + np.arange(len(b))
    before = np.cumsum(np.bincount(b_in_a, minlength=len(a) + 1))[: len(a)]
    return np.arange(len(a)) + before, b_at


def updated_day_viewers(
    old: DayViewers, media: np.ndarray, user: np.ndarray, fresh: DayViewers
) -> DayViewers:
    """A new day rollup: `old` without the rows of the changed (media, user) pairs (sorted,
    distinct), with `fresh` (those pairs' rows re-read, sorted; a pair no longer stored has
    none) merged in."""
    keep = np.ones(len(old.media), bool)
    at = find_pairs(old.media, old.user, media, user)
    keep[at[at >= 0]] = False
    return merge_day_rows(old, keep, fresh)


def merge_day_rows(old: DayViewers, keep: np.ndarray, fresh: DayViewers) -> DayViewers:
    """The `keep` rows of `old` and the rows of `fresh` (no pair in both; each sorted) as one
    day rollup, minute keys renumbered: linear in the rows, no sort."""
    kept_at, fresh_at = _interleave(
        _pair_codes(old.media[keep], old.user[keep]), _pair_codes(fresh.media, fresh.user)
    )
    count = len(kept_at) + len(fresh_at)

    def merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty(count, a.dtype)
        out[kept_at] = a[keep]
        out[fresh_at] = b
        return out

    row_at = np.full(len(old.media), -1, np.int64)
    row_at[keep] = kept_at
    old_row, old_hour = np.divmod(old.minute_key, 24)
    stays = keep[old_row]
    old_keys = row_at[old_row[stays]] * 24 + old_hour[stays]
    fresh_row, fresh_hour = np.divmod(fresh.minute_key, 24)
    fresh_keys = fresh_at[fresh_row] * 24 + fresh_hour
    old_key_at, fresh_key_at = _interleave(old_keys, fresh_keys)
    minute_key = np.empty(len(old_keys) + len(fresh_keys), np.int64)
    minute_key[old_key_at] = old_keys
    minute_key[fresh_key_at] = fresh_keys
    minute_bits = np.empty(len(minute_key), np.uint64)
    minute_bits[old_key_at] = old.minute_bits[stays]
    minute_bits[fresh_key_at] = fresh.minute_bits
    return DayViewers(
        merged(old.media, fresh.media),
        merged(old.user, fresh.user),
        merged(old.hours, fresh.hours),
        minute_key,
        minute_bits,
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
    lengths = np.searchsorted(sorted_ids, wanted, "right") - lo
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty
    owner = np.repeat(np.arange(len(wanted)), lengths)
    rows = np.arange(total) + (lo - (ends - lengths))[owner]  # each run from its first row
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
    distinct_owners, _ = _unique_pairs(owner, user)
    return np.bincount(distinct_owners, minlength=owners).astype(np.int64)


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
