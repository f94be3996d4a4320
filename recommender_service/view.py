"""An immutable, consistent picture of the state after one commit, for the query side.

The consumer thread publishes a new `View` after every commit (copy-on-write), so a query uses
one object for its whole computation: per-item sums over partitions (S, Q, n), the number of
users N, and a RocksDB snapshot taken at the same instant for the neighbour rows. Scores and the
position reported with them therefore always belong together, however the batches interleave.
The item table costs about 50 bytes per catalogue item; it does not grow with users or events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A dense lookup table (media id -> position) is used while ids are this dense, else bisection.
_LUT_MAX_SPARSITY = 16
_LUT_MIN_SIZE = 1 << 20


@dataclass(frozen=True)
class Stamp:
    """What an answer was computed from: offsets and event-time watermark of the snapshot."""

    version: int
    offsets: dict[int, int]
    watermark: int | None

    def offset(self, partition: int) -> int:
        """The next offset of `partition` in the snapshot. A partition with no stored offset
        has nothing applied in it: 0 (the topic keeps every record). Never the consumer's
        position, which may have moved past the snapshot since."""
        return self.offsets.get(partition, 0)


@dataclass
class View:
    """Item table and snapshot as of one commit. Treat as read-only once published."""

    version: int
    ids: np.ndarray  # sorted media ids (int64)
    s: np.ndarray  # S_i, heartbeats (int64)
    q: np.ndarray  # Q_i, heartbeats^2 (int64)
    n: np.ndarray  # n_i, viewers (int64)
    changed: np.ndarray  # version at which the item's own row or statistics last changed
    users: int  # N
    partitions: tuple[int, ...]
    snapshot: Any
    stamp: Stamp
    created: float = field(default_factory=time.monotonic)
    _lut: np.ndarray | None = field(default=None, repr=False)
    _popular: np.ndarray | None = field(default=None, repr=False)

    def position_of(self, media: int) -> int | None:
        """Index of a known item, or None."""
        k = int(np.searchsorted(self.ids, media))
        if k < len(self.ids) and int(self.ids[k]) == media:
            return k
        return None

    def positions_of(self, media: np.ndarray) -> np.ndarray:
        """Index of each item in this view, -1 for items it does not know."""
        if len(self.ids) == 0:
            return np.full(len(media), -1, dtype=np.int64)
        lut = self._lut
        if lut is None:
            top = int(self.ids[-1])
            if top < max(_LUT_MIN_SIZE, _LUT_MAX_SPARSITY * len(self.ids)):
                lut = np.full(top + 1, -1, dtype=np.int32)
                lut[self.ids] = np.arange(len(self.ids), dtype=np.int32)
                self._lut = lut  # benign race: two threads may build the same table
        if lut is not None:
            inside = (media >= 0) & (media < len(lut))
            return np.where(inside, lut[np.where(inside, media, 0)], -1)
        found = np.minimum(np.searchsorted(self.ids, media), len(self.ids) - 1)
        return np.where(self.ids[found] == media, found, -1)

    def popular_order(self) -> np.ndarray:
        """Item indices, most watched first: by viewers, then total view time, then media id."""
        order = self._popular
        if order is None:
            order = np.lexsort((self.ids, -self.s, -self.n))
            self._popular = order
        return order

    @classmethod
    def initial(
        cls,
        items: dict[int, tuple[int, int, int]],
        users: int,
        partitions: tuple[int, ...],
        snapshot: Any,
        stamp: Stamp,
    ) -> View:
        ids = np.array(sorted(items), dtype=np.int64)
        values = np.array([items[m] for m in ids.tolist()], dtype=np.int64).reshape(-1, 3)
        return cls(
            version=stamp.version,
            ids=ids,
            s=values[:, 0].copy(),
            q=values[:, 1].copy(),
            n=values[:, 2].copy(),
            changed=np.zeros(len(ids), dtype=np.int64),
            users=users,
            partitions=partitions,
            snapshot=snapshot,
            stamp=stamp,
        )

    def advanced(
        self,
        items: np.ndarray,
        deltas: np.ndarray,
        changed_items: np.ndarray,
        new_users: int,
        partitions: tuple[int, ...],
        snapshot: Any,
        stamp: Stamp,
    ) -> View:
        """The next view: add per-item (dS, dQ, dn) rows of `deltas` (an item may repeat;
        all-zero rows make an item known), insert new items, mark changed items."""
        ids, s, q, n, changed = self.ids, self.s, self.q, self.n, self.changed
        keys, where = np.unique(np.asarray(items, dtype=np.int64), return_inverse=True)
        if len(keys):
            values = np.zeros((len(keys), 3), dtype=np.int64)
            np.add.at(values, where.reshape(-1), deltas)
            if len(ids):
                known = ids[np.minimum(np.searchsorted(ids, keys), len(ids) - 1)] == keys
            else:
                known = np.zeros(len(keys), dtype=bool)
            fresh = keys[~known]
            if len(fresh):
                merged = np.concatenate((ids, fresh))
                order = np.argsort(merged, kind="stable")
                pad = np.zeros(len(fresh), dtype=np.int64)
                ids = merged[order]
                s = np.concatenate((s, pad))[order]
                q = np.concatenate((q, pad))[order]
                n = np.concatenate((n, pad))[order]
                changed = np.concatenate((changed, pad))[order]
            else:
                s, q, n, changed = s.copy(), q.copy(), n.copy(), changed.copy()
            pos = np.searchsorted(ids, keys)
            s[pos] += values[:, 0]
            q[pos] += values[:, 1]
            n[pos] += values[:, 2]
        if len(changed_items):
            if changed is self.changed:
                changed = changed.copy()
            changed[np.searchsorted(ids, changed_items)] = stamp.version
        return View(
            version=stamp.version,
            ids=ids,
            s=s,
            q=q,
            n=n,
            changed=changed,
            users=self.users + new_users,
            partitions=partitions,
            snapshot=snapshot,
            stamp=stamp,
        )
