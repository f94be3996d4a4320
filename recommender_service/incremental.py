"""The maths of keeping the sufficient statistics current, with no I/O.

For every user u and item i let w_ui be u's view time on i in heartbeats (waypoints). The
statistics are sums over users: S_i = sum w_ui, Q_i = sum w_ui^2, n_i = #{u: w_ui > 0},
D_ij = sum w_ui w_uj and c_ij = #{u: w_ui > 0 and w_uj > 0}. When a batch raises some of one
user's w from `old` to `new`, every pair with at least one raised item changes by
    dD_ij = new_i new_j - old_i old_j,    dc_ij = [old_i = 0 or old_j = 0]
(both items have new > 0 inside a window), which is exact and does not depend on the order of
the batch's events. Only pairs inside the user's window (the `cap` most recently watched items)
are updated, so the cost per raised item is bounded by the cap, not by users or items.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from recommender_service.key_layout import ROW
from viewevents.v1 import view_event_pb2

WAYPOINT = view_event_pb2.EVENT_TYPE_WAYPOINT


def combine_batch(
    events: Iterable[view_event_pb2.ViewEvent],
) -> tuple[dict[int, dict[int, int]], set[int]]:
    """Per user, the waypoints added per item (dict order = order of each item's last waypoint),
    and every item the batch mentions. Other event types add no view time; they only make the
    user "seen" (counted in N) and the item known."""
    per_user: dict[int, dict[int, int]] = {}
    items: set[int] = set()
    add_item = items.add
    for event in events:
        user = event.user_id
        media = event.media_id
        touched = per_user.get(user)
        if touched is None:
            touched = per_user[user] = {}
        if event.event_type == WAYPOINT:
            touched[media] = touched.pop(media, 0) + 1
        add_item(media)
    return per_user, items


def combine_columns(
    user_id: np.ndarray, media_id: np.ndarray, event_type: np.ndarray
) -> tuple[dict[int, dict[int, int]], set[int]]:
    """`combine_batch` of events given as columns (in offset order), without a message each:
    the same dicts in the same orders. Users keep the order of their first event; a user's
    items are inserted in the order of their last waypoint, which is what popping and
    re-inserting on every waypoint leaves."""
    users, first = np.unique(user_id, return_index=True)
    per_user: dict[int, dict[int, int]] = {u: {} for u in users[np.argsort(first)].tolist()}
    items = set(np.unique(media_id).tolist())
    rows = np.flatnonzero(event_type == WAYPOINT)
    if len(rows):
        order = np.lexsort((rows, media_id[rows], user_id[rows]))  # by user, item, offset
        rows = rows[order]
        user, media = user_id[rows], media_id[rows]
        last = np.flatnonzero(
            np.append((user[1:] != user[:-1]) | (media[1:] != media[:-1]), True)
        )  # the last waypoint of each (user, item)
        counts = np.diff(np.append(-1, last))
        by_time = np.argsort(rows[last], kind="stable")
        for u, m, count in zip(
            user[last][by_time].tolist(), media[last][by_time].tolist(), counts[by_time].tolist()
        ):
            per_user[u][m] = count
    return per_user, items


@dataclass
class WindowUpdate:
    """One user's new window and what changed, from `update_window`."""

    media: list[int]
    """New window, most recent first, at most `cap` items."""
    new: list[int]
    """View time of each window item after the batch."""
    old: list[int]
    """View time of each window item before the batch."""
    touched: list[bool]
    """Whether the batch raised the window item."""
    evicted: list[tuple[int, int]] = field(default_factory=list)
    """(media, w) that fell out of the window in this batch."""
    changes: list[tuple[int, int, int]] = field(default_factory=list)
    """(media, old, new) for every raised item, in or out of the window."""


def update_window(
    media: tuple[int, ...],
    w: tuple[int, ...],
    added: dict[int, int],
    outside: dict[int, int],
    cap: int,
) -> WindowUpdate:
    """Move the raised items to the front of the window (most recent first) and truncate to cap.

    `added` maps media -> waypoints added (in last-waypoint order), `outside` gives the old view
    time of raised items that had fallen out of the window (0 when absent: never watched)."""
    current = dict(zip(media, w))
    out = WindowUpdate([], [], [], [])
    for item in reversed(added):
        old = current.get(item)
        if old is None:
            old = outside.get(item, 0)
        new = old + added[item]
        out.media.append(item)
        out.old.append(old)
        out.new.append(new)
        out.touched.append(True)
        out.changes.append((item, old, new))
    for item, value in zip(media, w):
        if item not in added:
            out.media.append(item)
            out.old.append(value)
            out.new.append(value)
            out.touched.append(False)
    if len(out.media) > cap:
        out.evicted = list(zip(out.media[cap:], out.new[cap:]))
        del out.media[cap:], out.new[cap:], out.old[cap:], out.touched[cap:]
    return out


@dataclass
class FlatWindows:
    """Every updated user's window laid end to end, for vectorised pair generation."""

    media: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    old: list[int] = field(default_factory=list)
    touched: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def add(self, update: WindowUpdate) -> None:
        if not any(update.touched) or len(update.media) < 2:
            return  # a window of one item has no pairs
        self.media.extend(update.media)
        self.new.extend(update.new)
        self.old.extend(update.old)
        self.touched.extend(update.touched)
        self.lengths.append(len(update.media))


def pair_deltas(flat: FlatWindows) -> list[tuple[int, np.ndarray]]:
    """Row deltas per item: [(i, ROW entries (j, dD_ij, dc_ij) sorted by j)], sorted by i.

    Pairs are summed over users; both directions are emitted so that each item's row holds
    all of its neighbours."""
    if not flat.lengths:
        return []
    media = np.asarray(flat.media, dtype=np.int64)
    new = np.asarray(flat.new, dtype=np.int64)
    old = np.asarray(flat.old, dtype=np.int64)
    touched = np.asarray(flat.touched, dtype=bool)
    lengths = np.asarray(flat.lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    segment = np.repeat(np.arange(len(lengths)), lengths)
    t = np.flatnonzero(touched)
    reps = lengths[segment[t]]
    total = int(reps.sum())
    first = np.cumsum(reps) - reps
    a = np.repeat(t, reps)
    b = np.repeat(starts[segment[t]], reps) + (np.arange(total) - np.repeat(first, reps))
    # Each unordered pair once: skip self pairs, and pairs of two raised items are taken from
    # the earlier one only.
    keep = (b != a) & (~touched[b] | (b > a))
    a, b = a[keep], b[keep]
    d = new[a] * new[b] - old[a] * old[b]
    c = ((old[a] == 0) | (old[b] == 0)).astype(np.int64)
    x = np.concatenate((media[a], media[b]))
    y = np.concatenate((media[b], media[a]))
    d = np.concatenate((d, d))
    c = np.concatenate((c, c))
    order = np.lexsort((y, x))
    x, y, d, c = x[order], y[order], d[order], c[order]
    new_pair = np.concatenate(([True], (x[1:] != x[:-1]) | (y[1:] != y[:-1])))
    starts_pair = np.flatnonzero(new_pair)
    x = x[starts_pair]
    entries = np.empty(len(starts_pair), dtype=ROW)
    entries["j"] = y[starts_pair]
    entries["d"] = np.add.reduceat(d, starts_pair)
    entries["c"] = np.add.reduceat(c, starts_pair)
    bounds = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1], [True])))
    return [(int(x[lo]), entries[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
