"""Answers to the two queries, with the ranked-list cache and its warmer.

A neighbour row is read from the view's RocksDB snapshot (at most 1 + row_max_deltas chunks per
partition, one prefix scan each), summed per neighbour with numpy, scored against the in-memory
item table for both metrics at once, and the top `max_limit` of each metric are cached per item.
A cached list is exact for the view it was computed in; it is reused for later views only while
its own item is unchanged and for at most `cache_ttl_seconds`, and it always answers with the
position of the view it came from. A warmer thread fills the cache, most watched items first,
once the consumer has caught up and again whenever ingestion pauses, so that queries of a quiet
service are dictionary look-ups.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from recommender_service import key_layout as keys
from recommender_service import similarity as sim
from recommender_service.settings import RecommenderSettings, cached_item_bytes
from recommender_service.similarity import Metric, Ranked
from recommender_service.view import Stamp, View
from viewevents.kafka import KeyPartitioner, user_key

log = logging.getLogger(__name__)

# No commit for this long: ingestion paused, the warmer may refresh. Under a steady stream a
# batch commits every 0.3 to 1 s; at 0.5 s the warmer kept starting passes that the next batch
# made stale, and took ~17 % of the process's samples from the consumer (py-spy in the soak).
IDLE_SECONDS = 2.0


class UnknownItem(LookupError):
    """The media id has never appeared in an applied event."""


@dataclass(frozen=True)
class _Entry:
    version: int
    created: float
    lists: dict[Metric, Ranked]
    stamp: Stamp


@dataclass(frozen=True)
class UserHistory:
    """A user's window (most recent first) and every item they watched (for exclusion)."""

    media: list[int]
    weights: list[int]
    watched: np.ndarray


def window_of(snapshot: Any, partitions: Iterable[int], user: int) -> UserHistory | None:
    """The user's window from the first of `partitions` that has the user; None if none."""
    for partition in partitions:
        value = keys.snapshot_get(snapshot, keys.user_key(partition, user))
        if value is None:
            continue
        media, weights, has_evicted = keys.decode_window(value)
        watched = list(media)
        if has_evicted:
            prefix = keys.evicted_prefix(partition, user)
            watched += [
                keys.BIG_U64.unpack_from(k, len(prefix))[0] for k, _ in keys.scan(snapshot, prefix)
            ]
        return UserHistory(list(media), list(weights), np.asarray(watched, dtype=np.int64))
    return None


@dataclass(frozen=True)
class Recommendations:
    ids: np.ndarray
    scores: np.ndarray
    fallback: bool
    stamp: Stamp


class QueryEngine:
    """Thread-safe query side: called from the gRPC event loop and from the warmer thread."""

    def __init__(self, source: Callable[[], View], settings: RecommenderSettings) -> None:
        self._source = source
        self.settings = settings
        self.support = sim.Support(settings.min_co_viewers, settings.shrinkage)
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warmer: threading.Thread | None = None
        self._partitioners: dict[int, KeyPartitioner] = {}
        self.warm_passes = 0
        self.computed = 0

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def cached_items(self) -> int:
        return len(self._cache)

    def cache_bytes(self) -> int:
        """What the cached lists hold (about): their arrays' bytes plus the overhead per item
        that `settings.cached_item_bytes` charges, for the memory report."""
        with self._lock:
            entries = list(self._cache.values())
        overhead = cached_item_bytes(0)
        return sum(overhead + sum(r.nbytes for r in e.lists.values()) for e in entries)

    # --- similar media -------------------------------------------------------------------------

    def similar(self, media: int, metric: Metric, limit: int) -> tuple[Ranked, Stamp]:
        view = self._source()
        pos = view.position_of(media)
        if pos is None:
            raise UnknownItem(media)
        entry = self._lists(view, media, pos)
        return entry.lists[metric].head(limit), entry.stamp

    def _lists(self, view: View, media: int, pos: int, fresh: bool = False) -> _Entry:
        """The item's cached lists if still usable for `view` (see module doc), else computed;
        `fresh` accepts only lists computed for `view` or later."""
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(media)
            if entry is not None and fresh:
                if entry.version >= view.version:
                    return entry
            elif entry is not None:
                if entry.version >= view.version or (
                    now - entry.created < self.settings.cache_ttl_seconds
                    and int(view.changed[pos]) <= entry.version
                ):
                    self._cache.move_to_end(media)
                    return entry
        entry = _Entry(view.version, now, self.compute(view, media, pos), view.stamp)
        with self._lock:
            current = self._cache.get(media)
            if current is None or current.version <= entry.version:
                self._cache[media] = entry
                self._cache.move_to_end(media)
            while len(self._cache) > self.settings.cache_items:
                self._cache.popitem(last=False)
        return entry

    def compute(self, view: View, media: int, pos: int) -> dict[Metric, Ranked]:
        """Both metrics' top `max_limit` neighbours of one item, exact for `view`."""
        self.computed += 1
        entries = keys.read_row(view.snapshot, view.partitions, media)
        if len(entries) == 0:
            return {m: Ranked.empty() for m in Metric}
        where = view.positions_of(entries["j"])
        if (where < 0).any():  # neighbours newer than the view (see store.read_row): next time
            entries, where = entries[where >= 0], where[where >= 0]
            if len(entries) == 0:
                return {m: Ranked.empty() for m in Metric}
        if len(entries) * 8 < len(view.ids):
            found, inverse = np.unique(where, return_inverse=True)
            d = np.bincount(inverse, weights=entries["d"], minlength=len(found))
            co = np.bincount(inverse, weights=entries["c"], minlength=len(found))
            kept = co > 0  # as the dense branch: no co-viewer left (history cap) is no neighbour
            found, d, co = found[kept], d[kept], co[kept]
        else:
            d = np.bincount(where, weights=entries["d"], minlength=len(view.ids))
            co = np.bincount(where, weights=entries["c"], minlength=len(view.ids))
            found = np.flatnonzero(co > 0)
            d, co = d[found], co[found]
        co = co.astype(np.int64)
        item = (int(view.s[pos]), int(view.q[pos]))
        return {
            metric: sim.similar(
                view.ids[found],
                d,
                co,
                item,
                view.s[found],
                view.q[found],
                view.users,
                metric,
                self.support,
                self.settings.max_limit,
            )
            for metric in Metric
        }

    # --- recommendations -----------------------------------------------------------------------

    def history(self, view: View, user: int) -> UserHistory | None:
        """The user's window from the view's snapshot; None for a user never seen."""
        return window_of(view.snapshot, self._probe_order(view.partitions, user), user)

    def _probe_order(self, partitions: tuple[int, ...], user: int) -> list[int]:
        """The partition the Kafka partitioner sends the user to first, then the others (the
        topic may have had another partition count when the user was written)."""
        count = len(partitions)
        if not count:
            return []
        partitioner = self._partitioners.get(count)
        if partitioner is None:
            partitioner = self._partitioners[count] = KeyPartitioner(count, memo_size=0)
        first = partitioner(user_key(user))
        return [first] + [p for p in partitions if p != first]

    def recommend(self, user: int, limit: int) -> Recommendations:
        view = self._source()
        history = self.history(view, user)
        if history is not None and history.media:
            lists: list[Ranked] = []
            weights: list[float] = []
            stamp = view.stamp
            for media, weight in zip(history.media[: self.settings.user_items], history.weights):
                pos = view.position_of(media)
                if pos is None:
                    continue
                entry = self._lists(view, media, pos)
                if entry.stamp.version < stamp.version:
                    stamp = entry.stamp  # the answer is only as fresh as its oldest list
                lists.append(entry.lists[Metric.COSINE])
                weights.append(float(weight))
            ids, scores = sim.recommend(lists, weights, history.watched, limit)
            if len(ids):
                return Recommendations(ids, scores, False, stamp)
        watched = history.watched if history is not None else np.zeros(0, dtype=np.int64)
        ids, scores = sim.most_watched(view.popular_order(), view.ids, view.n, watched, limit)
        return Recommendations(ids, scores, True, view.stamp)

    # --- warming -------------------------------------------------------------------------------

    def start_warmer(self, ready: Callable[[], bool]) -> None:
        """Warm the cache in a daemon thread once `ready()` (caught up) is true."""
        self._warmer = threading.Thread(
            target=self._warm_loop, args=(ready,), daemon=True, name="recommender-warmer"
        )
        self._warmer.start()

    def stop_warmer(self) -> None:
        self._stop.set()
        if self._warmer is not None:
            self._warmer.join(timeout=5)

    def _warm_loop(self, ready: Callable[[], bool]) -> None:
        warmed = -1
        while not self._stop.wait(0.25):
            try:
                if not ready():
                    continue
                view = self._source()
                if view.version == warmed:
                    continue
                if warmed >= 0 and time.monotonic() - view.created < IDLE_SECONDS:
                    continue  # still ingesting: queries refresh what they need
                started = time.monotonic()
                if self.warm(view, abort_if_newer=warmed >= 0):
                    warmed = view.version
                    self.warm_passes += 1
                    log.info(
                        "cache warm for version %d: %d items in %.1f s",
                        view.version,
                        min(len(view.ids), self.settings.cache_items),
                        time.monotonic() - started,
                    )
            except Exception:  # noqa: BLE001 - warming is an optimisation; never kill the service
                log.exception("cache warming failed")

    def warm(self, view: View, abort_if_newer: bool = False) -> bool:
        """Compute the lists of the most watched items for `view`; False if interrupted."""
        for pos in view.popular_order()[: self.settings.cache_items].tolist():
            if self._stop.is_set() or (abort_if_newer and self._source().version != view.version):
                return False
            if view.n[pos] <= 0:
                break
            media = int(view.ids[pos])
            self._lists(view, media, pos, fresh=True)
            time.sleep(0)  # hand the GIL to the event loop between items
        return True
