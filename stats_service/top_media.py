"""ListTopMedia from the rollups (stats_service.rollups): exact for every metric, a bounded
number of cached entries per range.

View time and starts add up over time: the range is tiled (whole days, whole hours, the minutes
at the ragged edges) and each whole tile's per-media sums come from one rollup per partition;
runs of whole days come from aligned power-of-two blocks of days already summed over days and
partitions (derived entries, current while their days are).
An edge hour (partly inside the range) adds between nothing and its whole hour, so the exact
minutes of the edge hours are read (one multi-get of hour rows) only for the items that could
still make the page, and for those that have no event in a whole tile (are they in the range
at all?).

Unique viewers do not add up over time (a user watching two hours is one viewer), but they do
add up across partitions (a user's events are all in one partition). They are found by
bound-and-refine: the sum of the tiles' own viewer counts is an upper bound per item (each
tile's count is exact, and a viewer counted in several tiles is counted too often); the exact
count (the union of the item's viewers over the range) is computed for the best items by that
bound, the k-th best exact count then prunes every item whose bound is below it, and the exact
count is computed for those that remain. Exact unions read the day's viewer rows (a 24-bit mask
of hours per viewer-day, and a 60-bit mask of minutes per active viewer-hour): whole days and
whole hours from the hour mask, the ragged edge hours from the minute masks.

A page ranked by view time or starts gets its items' exact viewers the same way: from the
whole days' viewer rows when they are cached (or fit half the cache), else from each item's own
entries, kept and refreshed per item, partition and day: its users of each whole day (keys
alone) and its viewer rows of the edge days. A day of a steady stream holds far more
viewer-days than the cache, the page's few items far fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import compress, islice

import numpy as np

from stats_service import key_layout as k
from stats_service.request_parsing import ceil_to, floor_to, tiles
from stats_service.rollups import (
    VIEWER_CHUNK,
    BucketRollup,
    Changes,
    DayLayers,
    DayViewers,
    Entry,
    ItemUsers,
    Narrow,
    RollupCache,
    Stale,
    bucket_rollup,
    concat_day_viewers,
    day_layers,
    day_viewer_rows,
    day_viewers,
    distinct_per_owner,
    hour_mask,
    refreshed_day,
    rows_of,
    top_slots,
    updated_buckets,
    updated_item_users,
)
from viewevents.state.keys import partition_prefix, prefix_end
from viewevents.state.store import StateStore

VIEW_TIME, STARTS, VIEWERS = 0, 1, 2
_EXACT_CHUNK = 2_000  # items per exact union: bounds the pairs held at once
_FEW_ITEMS = 100  # a page this small may read its items' own bitmaps rather than load days
_VIEWER_ROW_BYTES = 48  # a day rollup's bytes per viewer-day, about (keys, masks, minute words)


@dataclass
class _Tiles:
    """A range's whole tiles summed per media slot and its edge hours' whole-hour sums (rows
    of view time, starts, viewers, rows count), and the edge hours themselves."""

    inside: np.ndarray
    edge: np.ndarray
    edges: list[tuple[int, int, int, int, BucketRollup]]  # partition, hour, minutes, rollup


def _sum_rollups(rollups: Sequence[BucketRollup], count: int) -> np.ndarray:
    """Per slot: view time, starts, viewers summed over the rollups, and how many rows (at
    least `count` slots, more if a rollup has a higher one)."""
    if not rollups:
        return np.zeros((count, 4), np.int64)
    slots = np.concatenate([r.slots for r in rollups])
    count = max(count, int(slots.max()) + 1) if len(slots) else count
    out = np.zeros((count, 4), np.int64)
    values = np.concatenate([r.values for r in rollups])
    for c in range(3):
        out[:, c] = np.rint(np.bincount(slots, weights=values[:, c], minlength=count))
    out[:, 3] = np.bincount(slots, minlength=count)
    return out


MAX_BLOCK_DAYS = 32  # the longest block of whole days summed into one entry


def day_blocks(low: int, high: int) -> list[tuple[int, int]]:
    """Whole days [low, high) (UTC day starts) as aligned power-of-two blocks (first day,
    days), at most MAX_BLOCK_DAYS each: a range of n days in about 2 log2(n) blocks, and the
    same blocks for every range that contains them (so they stay cached across rankings)."""
    out: list[tuple[int, int]] = []
    day, end = low // k.DAY, high // k.DAY
    while day < end:
        days = MAX_BLOCK_DAYS
        while day % days or day + days > end:
            days //= 2
        out.append((day * k.DAY, days))
        day += days
    return out


def _unkeyed(load: Callable[[int, int, int], Entry], key: tuple[str, int, int, int]) -> Entry:
    """A loader of (partition, size, start) called with an entry's whole key."""
    return load(*key[1:])


def _runs(lengths: Sequence[int], stored: np.ndarray) -> list[tuple[slice, slice]]:
    """For refreshes whose re-read keys are consecutive runs of these lengths: each run's
    keys, and its rows among the stored keys' values (only a stored key has a row)."""
    ends = np.cumsum(lengths, dtype=np.int64)
    stored_before = np.concatenate([[0], np.cumsum(stored, dtype=np.int64)])
    bounds = zip(
        (ends - lengths).tolist(),
        ends.tolist(),
        stored_before[ends - lengths].tolist(),
        stored_before[ends].tolist(),
    )
    return [(slice(lo, hi), slice(s_lo, s_hi)) for lo, hi, s_lo, s_hi in bounds]


def _ranking_rows(_key: object, changes: Changes) -> Changes:
    """The changes a bucket rollup holds: its ranking rows, not the day's viewer rows."""
    return Changes(changes.media, changes.viewer_media[:0], changes.viewer_user[:0])


def _viewer_rows(_key: object, changes: Changes) -> Changes:
    """The changes a day's viewer rollup holds: its viewer rows, not the ranking rows."""
    return Changes(changes.media[:0], changes.viewer_media, changes.viewer_user)


def _item_changes(_key: object, changes: Changes, media: int) -> Changes:
    """The changes one item's viewer entries hold: its viewer rows (sorted by media first)."""
    lo, hi = np.searchsorted(changes.viewer_media, [media, media + 1]).tolist()
    return Changes(changes.media[:0], changes.viewer_media[lo:hi], changes.viewer_user[lo:hi])


# Warming loads the bucket rollups (every ranking reads them), then the days' viewer rollups
# (rankings by unique viewers, a page's viewers), newest day first, until the cache is this
# full: the rest is left for what queries load (refreshed copies, older days) without evicting.
WARM_FILL = 0.8
EDGE_ROWS = 4_096  # edge hour rows read and decoded at once (1,240 bytes each decoded)
_EDGE_FIELDS = [0, 1, 4]  # of an hour row's bucket fields: view time, starts, unique viewers


def minute_span_sums(minutes: np.ndarray, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Per row of `minutes` (rows x 60 minutes x fields), its fields summed over the minutes
    [first, stop) of that row: one cumulative sum for rows cut at different minutes."""
    count = len(minutes)
    cumulative = np.zeros((count, minutes.shape[1] + 1, minutes.shape[2]), np.int64)
    np.cumsum(minutes, axis=1, out=cumulative[:, 1:])
    rows = np.arange(count)
    return cumulative[rows, stop] - cumulative[rows, first]


@dataclass
class Ranking:
    """The best `keep` items of a range: ids best first, their (view_time, starts, viewers)
    rows (viewers filled in only when ranked by them), and whether the range has more items
    than `keep` (another page)."""

    media: list[int]
    values: np.ndarray
    more: bool


class RollupRanker:
    """Rankings over the rollups of one store's partitions (all of them read locally)."""

    def __init__(self, store: StateStore, cache: RollupCache, max_tiles: int = 4_000) -> None:
        self.store = store
        self.cache = cache
        self.max_tiles = max_tiles  # per partition; longer ranges use the streaming path

    def covers(self, start: int, end: int) -> bool:
        """Whether the range has few enough tiles (days touched for viewers included)."""
        count = sum(
            (ceil_to(high, k.HOUR if size == k.MINUTE else size) - low)
            // (k.HOUR if size == k.MINUTE else size)
            for size, low, high in tiles(start, end)
        )
        days = (ceil_to(end, k.DAY) - floor_to(start, k.DAY)) // k.DAY
        return count + days <= self.max_tiles

    # --- rollup loaders (I/O) -------------------------------------------------------------

    def days_with_data(self, partitions: Sequence[int]) -> list[int]:
        """The days (UTC starts) with a ranking row in any of `partitions`, newest first: one
        seek per day and partition through the day ranking index (bucket-major)."""
        days: set[int] = set()
        for p in partitions:
            prefix = k.rank_prefix(p, k.DAY)
            end = prefix_end(prefix)
            low = prefix
            while (key := next(self.store.scan_keys(low, end), None)) is not None:
                day = k.unbiased(key[len(prefix) : len(prefix) + k.COLUMN_BYTES])
                days.add(day)
                low = prefix + k.biased(day + k.DAY)
        return sorted(days, reverse=True)

    def warm_day(
        self,
        partitions: Sequence[int],
        day: int,
        viewers: bool = False,
        stopped: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Load the day's bucket rollups of `partitions` (the day's, then its 24 hours'), or
        with `viewers` its viewer rollups, that are not cached and current, while the cache is
        under WARM_FILL of its budget; False once it is not (warming never evicts what queries
        brought in: it stops first), or once `stopped()` (the service shutting down)."""
        for p in partitions:
            if viewers:
                wanted = [("viewers", k.DAY, day)]
            else:
                wanted = [("bucket", k.DAY, day)]
                wanted += [("bucket", k.HOUR, day + h * k.HOUR) for h in range(24)]
            for kind, size, start in wanted:
                if self.cache.bytes >= WARM_FILL * self.cache.budget or stopped():
                    return False
                if self.cache.current(kind, p, size, start):
                    continue
                if viewers:
                    self._day_viewers(p, day)
                else:
                    self._bucket(p, size, start)
        return True

    def _bucket(self, partition: int, size: int, start: int) -> BucketRollup:
        return self._buckets([(partition, size, start)])[0]

    def _buckets(self, wanted: Sequence[tuple[int, int, int]]) -> list[BucketRollup]:
        """The current rollups of (partition, size, start) buckets."""
        keys = [("bucket", p, size, start) for p, size, start in wanted]
        load = partial(_unkeyed, self._load_bucket)
        entries = self._entries(keys, load, self._refresh_buckets, _ranking_rows)
        assert all(isinstance(e, BucketRollup) for e in entries)
        return entries  # type: ignore[return-value]

    def _entries(
        self,
        keys: Sequence[tuple[str, int, int, int]],
        load: Callable[[tuple[str, int, int, int]], Entry],
        refresh: Callable[[list[Stale]], list[Entry]],
        narrow: Narrow,
    ) -> list[Entry]:
        """The current entries of `keys`: the stale ones refreshed together, the missing
        ones loaded one at a time (held together: only for entries of bounded size)."""
        found = self.cache.refresh_all(keys, refresh, narrow)
        return [
            entry if entry is not None else self.cache.get(*key, partial(load, key))
            for entry, key in zip(found, keys)
        ]

    def _load_bucket(self, partition: int, size: int, start: int) -> BucketRollup:
        prefix = k.rank_prefix(partition, size) + k.biased(start)
        items = list(self.store.scan(prefix, prefix_end(prefix)))
        if not items:
            return BucketRollup(np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
        media = k.key_columns([key for key, _ in items], 1)
        rows = np.frombuffer(b"".join([v for _, v in items]), "<i8").reshape(
            len(items), k.BUCKET_FIELDS
        )
        return bucket_rollup(self.cache.media.slots(media), rows[:, [0, 1, 4]])

    def _refresh_buckets(self, stale: Sequence[Stale]) -> list[Entry]:
        """Bucket rollups brought up to date: every changed ranking row of all of them re-read
        with one multi-get, and merged into each."""
        media = [s.changes.media for s in stale]
        values, stored = self._read_changed(
            [k.rank_prefix(s.key[1], s.key[2]) for s in stale],
            [s.key[3] for s in stale],
            [[m] for m in media],
        )
        rows = np.frombuffer(
            b"".join(compress(values, stored.tolist())),  # type: ignore[arg-type]
            "<i8",
        ).reshape(-1, k.BUCKET_FIELDS)[:, [0, 1, 4]]
        slots = self.cache.media.slots(np.concatenate(media))
        runs = _runs([len(m) for m in media], stored)
        entries = [s.entry for s in stale]
        assert all(isinstance(e, BucketRollup) for e in entries)
        changed = [slots[keys] for keys, _ in runs]
        fresh = [mine[stored[keys]] for mine, (keys, _) in zip(changed, runs)]
        return list(
            updated_buckets(
                entries,  # type: ignore[arg-type]
                changed,
                fresh,
                [rows[found] for _, found in runs],
            )
        )

    def _day_block(self, partitions: Sequence[int], first: int, days: int) -> BucketRollup:
        """The day rollups of `days` days from `first`, summed over `partitions`: one entry
        instead of days x partitions (a 30-day ranking read 116 day rollups, about 80,000
        rows; their blocks are 8 entries of at most one row per media item)."""
        parts = [(p, k.DAY, first + i * k.DAY) for p in partitions for i in range(days)]

        def build() -> BucketRollup:
            sums = _sum_rollups(self._buckets(parts), 0)
            slots = np.flatnonzero(sums[:, 3])  # every item with a row, whatever its values
            return bucket_rollup(slots, sums[slots, :3])

        kind = "days of " + ",".join(map(str, partitions))
        entry = self.cache.get_derived(kind, days * k.DAY, first, parts, build)
        assert isinstance(entry, BucketRollup)
        return entry

    def _read_changed(
        self,
        prefixes: Sequence[bytes],
        starts: Sequence[int],
        columns: Sequence[Sequence[np.ndarray]],
    ) -> tuple[list[bytes | None], np.ndarray]:
        """The stored values of the keys refreshes re-read, for each refresh i the keys
        prefixes[i] + bucket starts[i] + its changed `columns[i]`, all in one multi-get (in
        that order), and which of them are stored."""
        counts = [len(c[0]) for c in columns]
        keys = k.pack_keys_of(
            prefixes,
            counts,
            [
                np.repeat(np.asarray(starts, np.int64), counts),
                *(np.concatenate([c[i] for c in columns]) for i in range(len(columns[0]))),
            ],
            (True, *(False for _ in columns[0])),
        )
        values = self.store.get_many(keys)
        return values, ~k.absent(values)

    def _day_viewers(self, partition: int, day: int) -> DayLayers:
        """A day's viewer rows of every item, from the cache, refreshed, or loaded."""
        [entry] = self._entries(
            [("viewers", partition, k.DAY, day)],
            lambda _: self._load_day_viewers(partition, day),
            self._refresh_viewers,
            _viewer_rows,
        )
        assert isinstance(entry, DayLayers)
        return entry

    def _load_day_viewers(self, partition: int, day: int) -> DayLayers:
        # Read and decode VIEWER_CHUNK rows at a time: a day can hold hundreds of thousands
        # of viewer-days, and each row's key, bitmap and decoding temporaries (about 2 KB
        # when the whole day was listed first) would otherwise be held all at once.
        prefix = k.presence_by_day_prefix(partition) + k.biased(day)
        items = self.store.scan(prefix, prefix_end(prefix))
        parts = []
        while chunk := list(islice(items, VIEWER_CHUNK)):
            keys = [key for key, _ in chunk]  # Q day media user
            parts.append(
                day_viewers(k.key_columns(keys, 1), k.key_columns(keys, 2), [v for _, v in chunk])
            )
        return day_layers(concat_day_viewers(parts))

    def _item_viewers(self, partition: int, day: int, media: int) -> DayLayers:
        """One item's viewer rows of one day (its `P` rows), refreshed like a day's: what a
        page's viewers need when the whole days' rollups are too large to keep (under a steady
        stream of new viewer-days, the soak's 3,000 events/s outgrow the cache in minutes)."""
        return self._items_day_viewers([partition], [day], [media])[0]

    def _load_item_viewers(self, partition: int, day: int, media: int) -> DayLayers:
        prefix = k.presence_prefix(partition, media) + k.biased(day)
        items = self.store.scan(prefix, prefix_end(prefix))
        parts = []
        while chunk := list(islice(items, VIEWER_CHUNK)):
            user = k.key_columns([key for key, _ in chunk], 2)  # P media day user
            owner = np.full(len(user), media, np.int64)
            parts.append(day_viewers(owner, user, [v for _, v in chunk]))
        return day_layers(concat_day_viewers(parts))

    def _refresh_viewers(self, stale: Sequence[Stale]) -> list[Entry]:
        """Days' viewer rows (all of a day's, or one item's) brought up to date: the changed
        pairs' rows of all of them re-read with one multi-get, decoded at once, and merged
        into each."""
        media = [s.changes.viewer_media for s in stale]
        user = [s.changes.viewer_user for s in stale]
        values, stored = self._read_changed(
            [k.presence_by_day_prefix(s.key[1]) for s in stale],
            [s.key[3] for s in stale],
            list(zip(media, user)),
        )
        fresh = day_viewers(
            np.concatenate(media)[stored],
            np.concatenate(user)[stored],
            list(compress(values, stored.tolist())),  # type: ignore[arg-type]
        )
        out: list[Entry] = []
        runs = _runs([len(m) for m in media], stored)
        for item, changed_media, changed_user, (_, found) in zip(stale, media, user, runs):
            assert isinstance(item.entry, DayLayers)
            mine = day_viewer_rows(fresh, found.start, found.stop)
            out.append(refreshed_day(item.entry, changed_media, changed_user, mine))
        return out

    # --- the ranking ------------------------------------------------------------------------

    def _tiles(self, partitions: Sequence[int], start: int, end: int) -> _Tiles:
        """Exact per-slot sums of the range's whole days and hours, and per edge hour (an
        hour only partly inside) its whole-hour rollup: an upper bound of its part."""
        whole: list[BucketRollup] = []
        wanted: list[tuple[int, int, int]] = []  # whole buckets, then the edge hours'
        cuts: list[tuple[int, int, int, int]] = []  # each edge: partition, hour, minutes
        for size, low, high in tiles(start, end):
            if size == k.DAY:
                for first, days in day_blocks(low, high):
                    if days == 1:
                        wanted.extend((p, k.DAY, first) for p in partitions)
                    else:
                        whole.append(self._day_block(partitions, first, days))
                continue
            for p in partitions:
                if size != k.MINUTE:
                    wanted.extend((p, size, b) for b in range(low, high, size))
                    continue
                for hour in range(floor_to(low, k.HOUR), high, k.HOUR):
                    first = (max(low, hour) - hour) // k.MINUTE
                    stop = (min(high, hour + k.HOUR) - hour) // k.MINUTE
                    cuts.append((p, hour, first, stop))
        found = self._buckets(wanted + [(p, k.HOUR, hour) for p, hour, _, _ in cuts])
        whole.extend(found[: len(wanted)])
        edges = [(*cut, rollup) for cut, rollup in zip(cuts, found[len(wanted) :])]
        count = len(self.cache.media)
        inside = _sum_rollups(whole, count)
        return _Tiles(inside, _sum_rollups([e[4] for e in edges], count), edges)

    def _edge_exact(self, found: _Tiles, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The edge hours' exact part inside the range for the items at `slots` (ascending):
        their hour rows' minute slots in the range, or the whole hour when its minutes were
        pruned. Returns (rows of view time, starts, minute viewers, and whether the item has an
        event there). The keys of every edge (partition, hour) are packed together and read
        with one multi-get, EDGE_ROWS at a time, and decoded and summed at once: numpy's fixed
        cost per call, paid per edge and on a few rows each, was most of a one-day ranking's
        CPU (cProfile, bench state)."""
        sums = np.zeros((len(slots), 3), np.int64)
        if len(slots) == 0:
            return sums, np.zeros(0, bool)
        wanted = np.zeros(int(slots[-1]) + 1, bool)
        wanted[slots] = True
        prefixes: list[bytes] = []
        hits: list[np.ndarray] = []
        cuts: list[tuple[int, int, int]] = []  # each edge read: hour, minutes [first, stop)
        for p, hour, first, stop, rollup in found.edges:
            candidates = rollup.slots[rollup.slots <= slots[-1]]
            hit = candidates[wanted[candidates]]
            if len(hit):
                prefixes.append(partition_prefix(p) + k.KIND_BUCKET[k.HOUR])
                hits.append(hit)
                cuts.append((hour, first, stop))
        if not hits:
            return sums, np.zeros(len(slots), bool)
        counts = list(map(len, hits))
        owners = np.concatenate(hits)
        per_key = np.repeat(np.array(cuts, np.int64), counts, axis=0)
        key_hour, key_first, key_stop = per_key[:, 0], per_key[:, 1], per_key[:, 2]
        keys = k.pack_keys_of(
            prefixes, counts, [self.cache.media.ids[owners], key_hour], (False, True)
        )
        rows_at = np.searchsorted(slots, owners)
        for low in range(0, len(keys), EDGE_ROWS):
            part = slice(low, low + EDGE_ROWS)
            rows, pruned = k.hour_rows_and_pruned(self.store.get_many(keys[part]))
            minutes = rows["minutes"][:, :, _EDGE_FIELDS]
            inside = minute_span_sums(minutes, key_first[part], key_stop[part])
            inside[pruned] = rows["hour"][pruned][:, _EDGE_FIELDS]  # pruned: the whole hour
            np.add.at(sums, rows_at[part], inside)
        return sums, sums[:, 2] > 0  # an event in a minute gives that minute a viewer

    def top(
        self, partitions: Sequence[int], start: int, end: int, column: int, keep: int
    ) -> Ranking:
        """The best `keep` items by `column` (VIEW_TIME, STARTS or VIEWERS), ties by media id.

        Whole tiles give exact sums; an edge hour adds between nothing and its whole hour. The
        edge hours' exact parts are read only for items whose upper bound reaches the keep-th
        best lower bound (the others cannot make the page), and for items seen only in edge
        hours when the page needs to know whether they are in the range at all. Begins a round
        of the cache (the page viewers, read next, belong to the same ranking)."""
        self.cache.new_round()
        found = self._tiles(partitions, start, end)
        inside, edge = found.inside, found.edge
        in_whole = inside[:, 3] > 0
        in_edge = edge[:, 3] > 0
        maybe = in_edge & ~in_whole  # in the range only if their edge minutes say so
        if column == VIEWERS:
            return self._top_viewers(partitions, start, end, found, in_whole, maybe, keep)
        lower = inside[:, column]
        best = np.sort(lower[in_whole])[::-1]
        floor = int(best[keep - 1]) if len(best) >= keep else -1
        need = np.flatnonzero(in_edge & (lower + edge[:, column] >= floor))
        extra, present_extra = self._edge_exact(found, need)
        present = in_whole.copy()
        present[need] |= present_extra
        values = inside[:, :3].copy()
        values[need] += extra
        refined = ~in_edge
        refined[need] = True
        # Not refined: an upper bound below `floor`, which keep items reach: off the page.
        pool = np.flatnonzero(present & refined)
        ids = self.cache.media.ids[pool]
        rows = values[pool]
        rows[:, 2] = 0
        best_rows = top_slots(rows[:, column], ids, keep)
        undecided = maybe.copy()
        undecided[need] = False
        more = self._more(found, int(present.sum()), np.flatnonzero(undecided), keep)
        return Ranking(ids[best_rows].tolist(), rows[best_rows], more)

    def _top_viewers(
        self,
        partitions: Sequence[int],
        start: int,
        end: int,
        found: _Tiles,
        in_whole: np.ndarray,
        maybe: np.ndarray,
        keep: int,
    ) -> Ranking:
        """By unique viewers: bound (the tiles' counts summed, edge hours whole) and refine
        (exact unions, which are 0 exactly for items without an event in the range)."""
        slots = np.flatnonzero(in_whole | maybe)
        ids = self.cache.media.ids[slots]
        bound = found.inside[slots, 2] + found.edge[slots, 2]
        exact = np.full(len(slots), -1, np.int64)
        first = top_slots(bound, ids, min(len(slots), 2 * keep))
        self._fill_exact(partitions, start, end, ids, first, exact)
        done = exact[first]
        if len(done) >= keep:
            floor = int(np.sort(done)[len(done) - keep])
            rest = np.flatnonzero((bound >= floor) & (exact < 0))
            self._fill_exact(partitions, start, end, ids, rest, exact)
        known = np.flatnonzero(exact > 0)
        rows = np.zeros((len(slots), 3), np.int64)
        rows[:, :2] = found.inside[slots, :2]
        rows[:, 2] = exact
        best = known[top_slots(exact[known], ids[known], keep)]
        touching = found.edge[slots[best], 3] > 0
        if touching.any():  # the page's view time and starts: add their exact edge minutes
            page = np.sort(slots[best][touching])
            extra, _ = self._edge_exact(found, page)
            rows[np.searchsorted(slots, page), :2] += extra[:, :2]
        present = int((exact > 0).sum()) + int((in_whole[slots] & (exact < 0)).sum())
        undecided = slots[maybe[slots] & (exact < 0)]
        more = self._more(found, present, undecided, keep)
        return Ranking(ids[best].tolist(), rows[best], more)

    def _more(self, found: _Tiles, present: int, undecided: np.ndarray, keep: int) -> bool:
        """Whether the range has more than `keep` items: `present` are known to be in it, the
        `undecided` (seen only in edge hours) are checked only when the answer depends on them."""
        if present > keep or present + len(undecided) <= keep:
            return present > keep
        _, in_range = self._edge_exact(found, np.sort(undecided))
        return present + int(in_range.sum()) > keep

    def _fill_exact(
        self,
        partitions: Sequence[int],
        start: int,
        end: int,
        ids: np.ndarray,
        positions: np.ndarray,
        exact: np.ndarray,
    ) -> None:
        """exact[positions] = the items' distinct viewers, in id order chunks."""
        order = positions[np.argsort(ids[positions])]
        for at in range(0, len(order), _EXACT_CHUNK):
            chunk = order[at : at + _EXACT_CHUNK]
            exact[chunk] = self.viewers(partitions, ids[chunk], start, end)

    def page_viewers(
        self,
        partitions: Sequence[int],
        media: np.ndarray,
        start: int,
        end: int,
        load_days: bool = True,
    ) -> np.ndarray:
        """Exact distinct users of a page's items (a ranking by view time or starts): from the
        day rollups when they are cached and current or cheap to refresh, or when loading the
        missing ones fits the cache (unless not `load_days`: one item's trend should not load
        every item's viewer rows of its days); else, for a small page, from each item's own
        entries (`_items_viewers`), rather than rebuilding days of hundreds of thousands of
        viewer-days that would not stay cached (a steady stream's days outgrow the cache)."""
        days = range(floor_to(start, k.DAY), ceil_to(end, k.DAY), k.DAY)
        if len(media) > _FEW_ITEMS or self._viewer_days_fit(partitions, days, load_days):
            return self.viewers(partitions, media, start, end)
        return self._items_viewers(partitions, media, start, end)

    def _items_viewers(
        self, partitions: Sequence[int], media: np.ndarray, start: int, end: int
    ) -> np.ndarray:
        """Exact distinct users of each item (ascending, distinct) over minute-aligned
        [start, end): the union of its users of each whole day (`ItemUsers`, keys alone: a
        30-day page needs over a thousand such entries, a few hundred bytes each) and of its
        viewer rows of the (at most two) edge days that have an event inside the range
        (`_item_viewers`), counted for all items at once. Entries are kept per item,
        partition and day (whole days also united over blocks of days, `_items_users`), and
        refreshed from the changed pairs, like the days' rollups."""
        whole_days = range(ceil_to(start, k.DAY), floor_to(end, k.DAY), k.DAY)
        blocks = day_blocks(whole_days.start, whole_days.stop) if whole_days else []
        edge_days = [
            day
            for day in range(floor_to(start, k.DAY), ceil_to(end, k.DAY), k.DAY)
            if day not in whole_days
        ]
        items = media.tolist()
        users: list[np.ndarray] = []
        sizes: list[int] = []  # users of each (partition, item), in that order
        edge_users: list[np.ndarray] = []
        edge_owners: list[np.ndarray] = []
        edge_entries = iter(self._items_day_viewers(partitions, edge_days, items))
        for p in partitions:
            for item in items:
                found = self._items_users(p, blocks, item)
                users.extend(found)
                sizes.append(sum(map(len, found)))
            for day in edge_days:
                rows = [next(edge_entries) for _ in items]
                user, owner = self._edge_day_users(day, rows, start, end)
                edge_users.append(user)
                edge_owners.append(owner)
        whole_owner = np.repeat(np.tile(np.arange(len(items)), len(partitions)), sizes)
        owner = np.concatenate([whole_owner, *edge_owners])
        if len(owner) == 0:
            return np.zeros(len(items), np.int64)
        return distinct_per_owner(owner, np.concatenate(users + edge_users), len(items))

    def _items_day_viewers(
        self, partitions: Sequence[int], days: Sequence[int], items: list[int]
    ) -> list[DayLayers]:
        """The items' viewer rows of each day in each partition (partition, then day, then
        item order), the stale entries of all of them refreshed together."""
        media_of = {
            (f"viewers of {m}", p, k.DAY, day): m for p in partitions for day in days for m in items
        }
        entries = self._entries(
            list(media_of),
            lambda key: self._load_item_viewers(key[1], key[3], media_of[key]),
            self._refresh_viewers,
            lambda key, changes: _item_changes(key, changes, media_of[key]),
        )
        assert all(isinstance(e, DayLayers) for e in entries)
        return entries  # type: ignore[return-value]

    def _edge_day_users(
        self, day: int, entries: Sequence[DayLayers], start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (user, item position) pairs of the items' viewer rows of a day cut by the range
        that have an event inside it (`entries`: each item's rows of the day, in item order):
        the items' rows side by side, checked in one go."""
        parts: list[DayViewers] = []
        live: list[np.ndarray] = []
        owner: list[np.ndarray] = []
        for at, entry in enumerate(entries):
            for found, dead in entry.layers():
                if found.rows:
                    parts.append(found)
                    live.append(np.ones(found.rows, bool) if dead is None else ~dead)
                    owner.append(np.full(found.rows, at, np.int64))
        if not parts:
            empty = np.zeros(0, np.int64)
            return empty, empty
        rows = np.flatnonzero(np.concatenate(live))
        both = concat_day_viewers(parts)
        rows = rows[self._partial_day(day, start, end, both, rows)]
        return both.user[rows], np.concatenate(owner)[rows]

    def _load_item_days(self, partition: int, media: int, days: list[int]) -> None:
        """Load with one scan an item's users of each of `days` (the range's blocks, when the
        first of them is built) that has no entry at all: loaded one day at a time, a 30-day
        page's first call opened over a thousand iterators (168 ms in the bench, against 71 ms
        when each item's range was read with one scan, uncached). Stale entries are left to
        their (cheap) refresh."""
        kind = f"users of {media}"
        missing = [d for d in days if self.cache.cached_rows(kind, partition, k.DAY, d) is None]
        if len(missing) < 2:
            return
        versions = [self.cache.versions.version(partition, k.DAY, d) for d in missing]
        prefix = k.presence_prefix(partition, media)
        keys = self.store.scan_keys(
            prefix + k.biased(missing[0]), prefix + k.biased(missing[-1] + k.DAY)
        )
        day_parts, user_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        while chunk := list(islice(keys, VIEWER_CHUNK)):  # P media day user
            matrix = k.key_matrix(chunk)
            day_parts.append(k.time_column(matrix, 1))
            user_parts.append(k.matrix_column(matrix, 2))
        stored_days = np.concatenate(day_parts)
        users = np.concatenate(user_parts)
        los = np.searchsorted(stored_days, missing).tolist()
        his = np.searchsorted(stored_days, [d + k.DAY for d in missing]).tolist()
        for day, version, lo, hi in zip(missing, versions, los, his):
            entry = ItemUsers(users[lo:hi].copy())
            self.cache.file_loaded(kind, partition, k.DAY, day, version, entry)

    def _items_users(
        self, partition: int, blocks: list[tuple[int, int]], media: int
    ) -> list[np.ndarray]:
        """One item's users of each block of whole days (`day_blocks`): a day's from its
        entry, a longer block's as the union of its days' (a derived entry, current while its
        days are)."""
        out: list[np.ndarray] = []
        unread = [True]  # the range's missing days not read yet (done by the first build)
        for first, days in blocks:
            if days == 1:
                out.append(self._item_users(partition, first, media).users)
                continue
            parts = [(partition, k.DAY, first + i * k.DAY) for i in range(days)]

            def build(parts: list[tuple[int, int, int]] = parts) -> ItemUsers:
                if unread:
                    unread.clear()
                    every = [a + i * k.DAY for a, n in blocks for i in range(n) if n > 1]
                    self._load_item_days(partition, media, every)
                users = [self._item_users(p, day, media).users for p, _, day in parts]
                return ItemUsers(np.unique(np.concatenate(users)))

            kind = f"users of {media} in {partition}"
            entry = self.cache.get_derived(kind, days * k.DAY, first, parts, build)
            assert isinstance(entry, ItemUsers)
            out.append(entry.users)
        return out

    def _item_users(self, partition: int, day: int, media: int) -> ItemUsers:
        """One item's users of one whole day, read as keys alone and refreshed from the
        changed (item, user) pairs: the users of a day wholly inside a range need no bitmap."""

        def load() -> ItemUsers:
            prefix = k.presence_prefix(partition, media) + k.biased(day)
            keys = self.store.scan_keys(prefix, prefix_end(prefix))
            parts = [np.zeros(0, np.int64)]
            while chunk := list(islice(keys, VIEWER_CHUNK)):
                parts.append(k.key_columns(chunk, 2))  # P media day user
            return ItemUsers(np.concatenate(parts))

        def refresh(entry: Entry, changes: Changes) -> ItemUsers:
            assert isinstance(entry, ItemUsers)
            user = changes.viewer_user
            prefix = k.presence_prefix(partition, media)
            _, stored = self._read_changed([prefix], [day], [[user]])
            return updated_item_users(entry, user, stored)

        entry = self.cache.get(
            f"users of {media}",
            partition,
            k.DAY,
            day,
            load,
            refresh,
            partial(_item_changes, media=media),
        )
        assert isinstance(entry, ItemUsers)
        return entry

    def _viewer_days_fit(self, partitions: Sequence[int], days: range, load: bool = True) -> bool:
        """Whether the days' viewer rollups are all cheap to bring up to date, or (with
        `load`) would take at most half of the cache (estimated from the day buckets' viewer
        counts: one rollup row per viewer-day)."""
        missing = [
            (p, day)
            for p in partitions
            for day in days
            if not self.cache.cheap("viewers", p, k.DAY, day)
        ]
        if not missing or not load:
            return not missing
        rows = sum(
            self.cache.cached_rows("viewers", p, k.DAY, day)
            or int(self._bucket(p, k.DAY, day).values[:, 2].sum())
            for p in partitions
            for day in days
        )
        return rows * _VIEWER_ROW_BYTES <= self.cache.budget // 2

    def viewers(
        self, partitions: Sequence[int], media: np.ndarray, start: int, end: int
    ) -> np.ndarray:
        """Exact distinct users over minute-aligned [start, end) of each item of `media`
        (ascending, distinct): the union of the item's viewer-days, summed over partitions."""
        days = range(floor_to(start, k.DAY), ceil_to(end, k.DAY), k.DAY)
        keys = [("viewers", p, k.DAY, day) for p in partitions for day in days]
        refreshed = self.cache.refresh_all(keys, self._refresh_viewers, _viewer_rows)
        found = dict(zip(keys, refreshed))  # the stale ones refreshed together; None: load

        def day_rows(partition: int, day: int) -> DayLayers:
            entry = found.pop(("viewers", partition, k.DAY, day))
            if entry is None:  # loaded one day at a time: a range's days may not fit at once
                return self._day_viewers(partition, day)
            assert isinstance(entry, DayLayers)
            return entry

        return self._viewers_from(partitions, media, start, end, day_rows)

    def _viewers_from(
        self,
        partitions: Sequence[int],
        media: np.ndarray,
        start: int,
        end: int,
        day_rows: Callable[[int, int], DayLayers],
    ) -> np.ndarray:
        """`viewers` over the rows `day_rows(partition, day)` gives (whole days or one item's)."""
        counts = np.zeros(len(media), np.int64)
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        for p in partitions:
            owners: list[np.ndarray] = []
            users: list[np.ndarray] = []
            for day in range(first_day, end_day, k.DAY):
                for found, dead in day_rows(p, day).layers():
                    if found.rows == 0:  # an empty delta: most days' when nothing streams
                        continue
                    rows, owner = rows_of(found.media, media)
                    if dead is not None and len(rows):
                        live = ~dead[rows]
                        rows, owner = rows[live], owner[live]
                    if len(rows) == 0:
                        continue
                    if start > day or day + k.DAY > end:
                        take = self._partial_day(day, start, end, found, rows)
                        rows, owner = rows[take], owner[take]
                    owners.append(owner)
                    users.append(found.user[rows])
            if owners:
                counts += distinct_per_owner(
                    np.concatenate(owners), np.concatenate(users), len(media)
                )
        return counts

    @staticmethod
    def _partial_day(
        day: int, start: int, end: int, found: DayViewers, rows: np.ndarray
    ) -> np.ndarray:
        """Which viewer-day rows of a day cut by the range have an event inside it: by the hour
        mask for whole hours, by the hour's minute mask for the (at most two) edge hours."""
        offset_start, offset_end = start - day, end - day
        whole = hour_mask(-(-offset_start // k.HOUR), offset_end // k.HOUR)
        touched = hour_mask(offset_start // k.HOUR, -(-offset_end // k.HOUR))
        hours = found.hours[rows].astype(np.int64)
        take = (hours & whole) != 0
        for hour in range(24):
            bit = 1 << hour
            if not (touched & ~whole) & bit:
                continue
            check = np.flatnonzero(~take & ((hours & bit) != 0))
            if len(check):
                first = max(0, offset_start - hour * k.HOUR) // k.MINUTE
                stop = min(k.HOUR, offset_end - hour * k.HOUR) // k.MINUTE
                minutes = ((1 << stop) - 1) ^ ((1 << first) - 1)
                take[check] = found.active(rows[check], hour, minutes)
        return take
