"""Per-partition partial sums for one item, read from local state, added up and scored.

Every statistic is a sum over users and a user lives in one partition, so the sums over a set
of partitions add exactly: an instance that owns only some partitions reads its part here, the
other owners' parts arrive over RecommenderPartitionService, and `add` + `score` give exactly
what one instance holding every partition computes (`QueryEngine.compute`).

Reading: when the view's item table covers exactly the asked partitions the item sums come
from it. Otherwise the store still holds partitions this instance owned before a rebalance
(every instance but the last to join, in a group that formed while consuming). Then, once
those other partitions stand still (same offsets in two views in a row: nothing is applied to
a partition this instance no longer owns), their sums are read once (`Remainder`) and
subtracted from the table; until then, or while they move, the asked partitions' sums are
point reads from the view's snapshot. The neighbour
row is scanned from the snapshot as `QueryEngine.compute` does, and as there, row entries of
items the snapshot does not know yet (rocksdict iterators read current data) are left out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from recommender_service import key_layout as keys
from recommender_service import similarity as sim
from recommender_service.similarity import Metric, Ranked
from recommender_service.view import View

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ItemSums:
    """S, Q, n of items over some partitions; ids ascending and unique."""

    ids: np.ndarray
    s: np.ndarray
    q: np.ndarray
    n: np.ndarray

    @classmethod
    def empty(cls) -> ItemSums:
        return cls(_EMPTY, _EMPTY, _EMPTY, _EMPTY)

    def has(self, media: int) -> bool:
        k = int(np.searchsorted(self.ids, media))
        return k < len(self.ids) and int(self.ids[k]) == media


@dataclass(frozen=True)
class ItemPartials:
    """One owner's part of an item query: aggregated row, item sums, users, and the offsets
    and watermark of the state they were read from."""

    row: np.ndarray  # keys.ROW entries, one per neighbour, ascending j
    items: ItemSums
    users: int
    offsets: dict[int, int]
    watermark: int | None


class Remainder:
    """The item sums of the partitions a view holds beyond the asked ones, kept while those
    partitions stand still, so that the asked partitions' sums are the view's table minus
    these: exact, since a partition's records change only with its offset. One per instance;
    query threads share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: tuple[tuple[int, int], ...] | None = None
        self._kept: tuple[tuple[tuple[int, int], ...], ItemSums] | None = None
        self.reads = 0  # times the other partitions' sums were read (tests, logs)

    def sums(self, view: View, others: Sequence[int]) -> ItemSums | None:
        """The sums of `others` as of `view`, or None while they are not known to stand still
        (first seen at these offsets: the caller reads the asked partitions directly)."""
        state = tuple((p, view.stamp.offset(p)) for p in others)
        with self._lock:
            if self._kept is not None and self._kept[0] == state:
                return self._kept[1]
            steady, self._seen = self._seen == state, state
        if not steady:
            return None
        found = _from_snapshot(view.snapshot, others, view.ids)
        with self._lock:
            self._kept = (state, found)
            self.reads += 1
        return found


def read(
    view: View,
    partitions: Sequence[int],
    media: int = 0,
    item_ids: Iterable[int] = (),
    all_items: bool = False,
    remainder: Remainder | None = None,
) -> ItemPartials:
    """This instance's partials over `partitions` (which it must own and have caught up on)."""
    parts = sorted(set(partitions))
    snapshot = view.snapshot
    row = (
        keys.aggregate_row(keys.read_row(snapshot, parts, media))
        if media
        else np.zeros(0, dtype=keys.ROW)
    )
    wanted = np.unique(
        np.concatenate(
            (
                np.asarray([media] if media else [], dtype=np.int64),
                row["j"].astype(np.int64),
                np.fromiter(item_ids, dtype=np.int64),
            )
        )
    )
    others = sorted(set(view.partitions) - set(parts))
    if not others:
        items = _from_table(view, None if all_items else wanted)
        users = view.users
    else:
        rest = remainder.sums(view, others) if remainder is not None else None
        if rest is not None:
            items = _table_minus(view, parts, view.ids if all_items else wanted, rest)
        else:
            items = _from_snapshot(snapshot, parts, None if all_items else wanted)
        users = sum(
            keys.decode_counts(keys.snapshot_get(snapshot, keys.counts_key(p))) for p in parts
        )
    if len(row):
        row = row[np.isin(row["j"], items.ids)]  # neighbours newer than the snapshot: later
    # Every asked partition is listed (one with nothing applied at 0): an answer whose
    # position left it out would look partial.
    offsets = {p: view.stamp.offset(p) for p in parts}
    watermark: int | None = None
    for partition in parts:
        mark = keys.snapshot_get(snapshot, keys.watermark_key_of(partition))
        if mark is not None:
            seconds = keys.decode_offset(mark)
            watermark = seconds if watermark is None else max(watermark, seconds)
    return ItemPartials(row, items, int(users), offsets, watermark)


def _from_table(view: View, wanted: np.ndarray | None) -> ItemSums:
    if wanted is None:
        return ItemSums(view.ids, view.s, view.q, view.n)
    where = view.positions_of(wanted)
    where = where[where >= 0]
    return ItemSums(view.ids[where], view.s[where], view.q[where], view.n[where])


def _table_minus(
    view: View, partitions: Sequence[int], wanted: np.ndarray, rest: ItemSums
) -> ItemSums:
    """Sums over `partitions` of the `wanted` items (sorted, unique): the view's table, which
    holds every partition of the store, minus the other partitions' sums. An item that comes
    out all zero may have no record in `partitions` at all: those few are checked by point
    reads, so that the items listed are exactly those `_from_snapshot` lists."""
    where = view.positions_of(wanted)
    at = where[where >= 0]
    ids = view.ids[at]
    s, q, n = view.s[at].copy(), view.q[at].copy(), view.n[at].copy()
    if len(rest.ids) and len(ids):
        k = np.minimum(np.searchsorted(rest.ids, ids), len(rest.ids) - 1)
        hit = rest.ids[k] == ids
        s[hit] -= rest.s[k[hit]]
        q[hit] -= rest.q[k[hit]]
        n[hit] -= rest.n[k[hit]]
    keep = (s != 0) | (q != 0) | (n != 0)
    unsure = np.flatnonzero(~keep)
    if len(unsure):
        keep[
            unsure[np.isin(ids[unsure], _from_snapshot(view.snapshot, partitions, ids[unsure]).ids)]
        ] = True
    return ItemSums(ids[keep], s[keep], q[keep], n[keep])


def _from_snapshot(
    snapshot: object, partitions: Sequence[int], wanted: np.ndarray | None
) -> ItemSums:
    """Item sums over `partitions` from the snapshot's item records (those of `wanted`, sorted
    and unique, or every item's)."""
    if wanted is None:
        return _all_from_snapshot(snapshot, partitions)
    # An instance whose store still holds partitions it no longer owns (after a rebalance)
    # answers every fan-out this way, for the item and each of its neighbours: one point read
    # per item and partition (a rocksdict Snapshot has no multi-get), but the keys, the
    # decoding and the sums in numpy. Per item in Python, this was most of the asking
    # instance's time in GetSimilarMedia with 2 instances (py-spy).
    s, q, n = (np.zeros(len(wanted), dtype=np.int64) for _ in range(3))
    present = np.zeros(len(wanted), dtype=bool)
    for partition in partitions:
        values = [keys.snapshot_get(snapshot, k) for k in keys.item_keys(partition, wanted)]
        present |= np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
        records = keys.decode_items(values)  # a missing record decodes as zeros
        s += records["s"]
        q += records["q"]
        n += records["n"]
    return ItemSums(wanted[present].astype(np.int64), s[present], q[present], n[present])


def _all_from_snapshot(snapshot: object, partitions: Sequence[int]) -> ItemSums:
    """Every item's sums over `partitions`, by scanning their item records."""
    found: dict[int, list[int]] = {}
    for partition in partitions:
        prefix = keys.partition_prefix(partition) + keys.KIND_ITEM
        for key, value in keys.scan(snapshot, prefix, False):
            record = keys.ItemRecord.decode(value)
            acc = found.setdefault(keys.BIG_U64.unpack_from(key, len(prefix))[0], [0, 0, 0])
            acc[0] += record.s
            acc[1] += record.q
            acc[2] += record.n
    ids = np.array(sorted(found), dtype=np.int64)
    values = np.array([found[m] for m in ids.tolist()], dtype=np.int64).reshape(-1, 3)
    return ItemSums(ids, values[:, 0].copy(), values[:, 1].copy(), values[:, 2].copy())


# --- adding up -----------------------------------------------------------------------------


def add_items(parts: Sequence[ItemSums]) -> ItemSums:
    """Item sums of disjoint partition sets added up (exact int64)."""
    ids = np.concatenate([p.ids for p in parts]) if parts else _EMPTY
    if len(ids) == 0:
        return ItemSums.empty()
    unique, inverse = np.unique(ids, return_inverse=True)
    out = [np.zeros(len(unique), dtype=np.int64) for _ in range(3)]
    for k, name in enumerate(("s", "q", "n")):
        np.add.at(out[k], inverse, np.concatenate([getattr(p, name) for p in parts]))
    return ItemSums(unique, out[0], out[1], out[2])


def add_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Neighbour rows of disjoint partition sets added up per neighbour (exact int64)."""
    if not rows:
        return np.zeros(0, dtype=keys.ROW)
    return keys.aggregate_row(np.concatenate(rows))


def score(
    media: int,
    row: np.ndarray,
    items: ItemSums,
    users: int,
    metric: Metric,
    support: sim.Support,
    limit: int,
) -> Ranked:
    """The item's ranked neighbours from complete sums, as `QueryEngine.compute` ranks them:
    neighbours with no co-viewer left are none, unknown neighbours are skipped."""
    k = int(np.searchsorted(items.ids, media))
    if not items.has(media):
        return Ranked.empty()
    row = row[row["c"] > 0]
    where = np.searchsorted(items.ids, row["j"])
    inside = where < len(items.ids)
    inside[inside] = items.ids[where[inside]] == row["j"][inside]
    row, where = row[inside], where[inside]
    if len(row) == 0:
        return Ranked.empty()
    return sim.similar(
        row["j"].astype(np.int64),
        row["d"].astype(np.int64),
        row["c"].astype(np.int64),
        (int(items.s[k]), int(items.q[k])),
        items.s[where],
        items.q[where],
        users,
        metric,
        support,
        limit,
    )


def popularity(items: ItemSums) -> np.ndarray:
    """Item indices, most watched first, as `View.popular_order`."""
    return np.lexsort((items.ids, -items.s, -items.n))
