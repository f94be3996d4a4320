"""ListTopMedia from the rollups (stats_service.rollups): exact for every metric, a bounded
number of cached entries per range.

View time and starts add up over time: the range is tiled (whole days, whole hours, the minutes
at the ragged edges) and each tile's per-media sums come from one rollup per partition.

Unique viewers do not add up over time (a user watching two hours is one viewer), but they do
add up across partitions (a user's events are all in one partition). They are found by
bound-and-refine: the sum of the tiles' own viewer counts is an upper bound per item (each
tile's count is exact, and a viewer counted in several tiles is counted too often); the exact
count (the union of the item's viewers over the range) is computed for the best items by that
bound, the k-th best exact count then prunes every item whose bound is below it, and the exact
count is computed for those that remain. Exact unions read the day's viewer rows (a 24-bit mask
of hours per viewer-day): whole days and whole hours from the mask, and only the viewers seen
solely in a ragged edge hour have their minute bitmap read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stats_service import key_layout as k
from stats_service.request_parsing import ceil_to, floor_to, tiles
from stats_service.rollups import (
    BucketRollup,
    DayViewers,
    MinuteRollup,
    RollupCache,
    day_viewers,
    distinct_per_owner,
    hour_mask,
    rows_of,
    top_slots,
)
from viewevents.state.keys import prefix_end
from viewevents.state.store import StateStore

VIEW_TIME, STARTS, VIEWERS = 0, 1, 2
_EXACT_CHUNK = 2_000  # items per exact union: bounds the pairs held at once


@dataclass
class Ranking:
    """The best `keep` items of a range: ids best first, their (view_time, starts, viewers)
    rows (viewers filled in only when ranked by them), and how many items the range has."""

    media: list[int]
    values: np.ndarray
    total: int


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

    def _bucket(self, partition: int, size: int, start: int) -> BucketRollup:
        def load() -> BucketRollup:
            prefix = k.rank_prefix(partition, size) + k.biased(start)
            items = list(self.store.scan(prefix, prefix_end(prefix)))
            if not items:
                return BucketRollup(np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
            media = k.key_columns([key for key, _ in items], 1)
            rows = np.frombuffer(b"".join([v for _, v in items]), "<i8").reshape(
                len(items), k.BUCKET_FIELDS
            )
            return BucketRollup(self.cache.media.slots(media), rows[:, [0, 1, 4]].copy())

        entry = self.cache.get("bucket", partition, size, start, load)
        assert isinstance(entry, BucketRollup)
        return entry

    def _minutes(self, partition: int, hour: int) -> MinuteRollup:
        def load() -> MinuteRollup:
            prefix = k.rank_prefix(partition, k.HOUR) + k.biased(hour)
            keys = [key for key, _ in self.store.scan(prefix, prefix_end(prefix))]
            if not keys:
                empty = np.zeros(0, np.int64)
                return MinuteRollup(empty, empty, np.zeros((0, 3), np.int64))
            rows, pruned = k.hour_rows_and_pruned(
                self.store.get_many([k.hour_row_key_of_rank_key(partition, key) for key in keys])
            )
            minutes = rows["minutes"]  # (items, 60, 5)
            item, minute = np.nonzero(minutes[:, :, 4] > 0)  # a minute with events has viewers
            slots = self.cache.media.slots(k.key_columns(keys, 1))
            values = minutes[item, minute][:, [0, 1, 4]].astype(np.int64)
            whole = np.flatnonzero(pruned)  # minutes pruned: one row for the whole hour
            return MinuteRollup(
                np.concatenate([slots[item], slots[whole]]),
                np.concatenate([minute.astype(np.int64), np.full(len(whole), -1, np.int64)]),
                np.concatenate([values, rows["hour"][whole][:, [0, 1, 4]].astype(np.int64)]),
            )

        entry = self.cache.get("minutes", partition, k.HOUR, hour, load)
        assert isinstance(entry, MinuteRollup)
        return entry

    def _day_viewers(self, partition: int, day: int) -> DayViewers:
        def load() -> DayViewers:
            prefix = k.presence_by_day_prefix(partition) + k.biased(day)
            items = list(self.store.scan(prefix, prefix_end(prefix)))
            keys = [key for key, _ in items]  # Q day media user
            if not keys:
                empty = np.zeros(0, np.int64)
                return day_viewers(empty, empty, [])
            return day_viewers(
                k.key_columns(keys, 1), k.key_columns(keys, 2), [v for _, v in items]
            )

        entry = self.cache.get("viewers", partition, k.DAY, day, load)
        assert isinstance(entry, DayViewers)
        return entry

    # --- the ranking ------------------------------------------------------------------------

    def sums(self, partitions: Sequence[int], start: int, end: int) -> tuple[np.ndarray, ...]:
        """Per dense media slot over minute-aligned [start, end): view time, starts, an upper
        bound of the unique viewers (the sum of the tiles' counts), and whether the item has
        an event there."""
        slot_parts: list[np.ndarray] = []
        value_parts: list[np.ndarray] = []
        for size, low, high in tiles(start, end):
            for p in partitions:
                if size != k.MINUTE:
                    for bucket in range(low, high, size):
                        rollup = self._bucket(p, size, bucket)
                        slot_parts.append(rollup.slots)
                        value_parts.append(rollup.values)
                    continue
                for hour in range(floor_to(low, k.HOUR), high, k.HOUR):
                    minutes = self._minutes(p, hour)
                    first = (max(low, hour) - hour) // k.MINUTE
                    stop = (min(high, hour + k.HOUR) - hour) // k.MINUTE
                    inside = ((minutes.minute >= first) & (minutes.minute < stop)) | (
                        minutes.minute < 0
                    )
                    slot_parts.append(minutes.slots[inside])
                    value_parts.append(minutes.values[inside])
        count = len(self.cache.media)
        slots = np.concatenate(slot_parts) if slot_parts else np.zeros(0, np.int64)
        values = np.concatenate(value_parts) if value_parts else np.zeros((0, 3), np.int64)
        columns = [
            np.rint(np.bincount(slots, weights=values[:, c], minlength=count)).astype(np.int64)
            for c in range(3)
        ]
        present = np.bincount(slots, minlength=count) > 0
        return columns[0], columns[1], columns[2], present

    def top(
        self, partitions: Sequence[int], start: int, end: int, column: int, keep: int
    ) -> Ranking:
        """The best `keep` items by `column` (VIEW_TIME, STARTS or VIEWERS), ties by media id."""
        view_time, starts, bound, present = self.sums(partitions, start, end)
        slots = np.flatnonzero(present)
        ids = self.cache.media.ids[slots]
        rows = np.zeros((len(slots), 3), np.int64)
        rows[:, 0], rows[:, 1] = view_time[slots], starts[slots]
        if column != VIEWERS:
            best = top_slots(rows[:, column], ids, keep)
            return Ranking(ids[best].tolist(), rows[best], len(slots))
        exact = np.full(len(slots), -1, np.int64)
        first = top_slots(bound[slots], ids, min(len(slots), 2 * keep))
        self._fill_exact(partitions, start, end, ids, first, exact)
        done = exact[first]
        if len(done) >= keep:
            floor = int(np.sort(done)[len(done) - keep])
            rest = np.flatnonzero((bound[slots] >= floor) & (exact < 0))
            self._fill_exact(partitions, start, end, ids, rest, exact)
        known = np.flatnonzero(exact >= 0)
        rows[:, 2] = exact
        best = known[top_slots(exact[known], ids[known], keep)]
        return Ranking(ids[best].tolist(), rows[best], len(slots))

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

    def viewers(
        self, partitions: Sequence[int], media: np.ndarray, start: int, end: int
    ) -> np.ndarray:
        """Exact distinct users over minute-aligned [start, end) of each item of `media`
        (ascending, distinct): the union of the item's viewer-days, summed over partitions."""
        counts = np.zeros(len(media), np.int64)
        first_day, end_day = floor_to(start, k.DAY), ceil_to(end, k.DAY)
        for p in partitions:
            owners: list[np.ndarray] = []
            users: list[np.ndarray] = []
            for day in range(first_day, end_day, k.DAY):
                found = self._day_viewers(p, day)
                rows, owner = rows_of(found.media, media)
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
