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
from dataclasses import dataclass

import numpy as np

from recommender_service.key_layout import ROW
from viewevents.v1 import view_event_pb2

WAYPOINT = view_event_pb2.EVENT_TYPE_WAYPOINT


def combine_batch(
    events: Iterable[view_event_pb2.ViewEvent],
) -> tuple[dict[int, dict[int, int]], set[int]]:
    """Per user, the waypoints added per item (dict order = order of each item's last waypoint),
    and every item the batch mentions. Other event types add no view time; they only make the
    user "seen" (counted in N) and the item known. The readable definition that the processor's
    `combine_arrays` is tested against (through `combine_columns`)."""
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
class Raised:
    """What one partition batch adds, per (user, item) with waypoints, as numpy columns."""

    users: np.ndarray
    """Every user of the batch (int64), in the order of their first event."""
    user: np.ndarray
    """Per raised (user, item): index into `users`."""
    media: np.ndarray
    count: np.ndarray
    """Waypoints added."""
    last: np.ndarray
    """Recency of the item's last waypoint within its user (larger = later)."""
    items: np.ndarray
    """Every item the batch mentions (sorted; starts and stops make an item known too)."""


def combine_arrays(user_id: np.ndarray, media_id: np.ndarray, event_type: np.ndarray) -> Raised:
    """`combine_columns` without a dict per user: the batch's waypoints per (user, item), with
    no Python work per event or per user (the consumer's hot path)."""
    users, first, inverse = np.unique(user_id, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty(len(users), dtype=np.int64)
    rank[by_first] = np.arange(len(users))
    index = rank[inverse.reshape(-1)]
    rows = np.flatnonzero(event_type == WAYPOINT)
    user, media = index[rows], media_id[rows].astype(np.int64)
    order = np.lexsort((rows, media, user))  # by user, item, offset
    rows, user, media = rows[order], user[order], media[order]
    last = np.flatnonzero(np.append((user[1:] != user[:-1]) | (media[1:] != media[:-1]), True))
    last = last[: len(rows)]  # no waypoint at all: no group
    counts = np.diff(np.append(-1, last))
    return Raised(
        users[by_first].astype(np.int64),
        user[last],
        media[last],
        counts.astype(np.int64),
        rows[last].astype(np.int64),
        np.unique(media_id).astype(np.int64),
    )


def pair_deltas(
    media: np.ndarray,
    new: np.ndarray,
    old: np.ndarray,
    touched: np.ndarray,
    lengths: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row deltas of updated windows laid end to end (`lengths` each): the items whose row
    changes (sorted), their ROW entries (j, dD_ij, dc_ij) end to end, each row's sorted by j,
    and where each row's entries start (one more bound at the end).

    Pairs are summed over users; both directions are emitted so that each item's row holds
    all of its neighbours. A pair is one int64 key (dense codes of both items), so the batch's
    pairs are summed with one sort."""
    empty = np.zeros(0, dtype=np.int64)
    nothing = (empty, np.zeros(0, dtype=ROW), np.zeros(1, dtype=np.int64))
    if len(lengths) == 0:
        return nothing
    media = np.asarray(media, dtype=np.int64)
    new = np.asarray(new, dtype=np.int64)
    old = np.asarray(old, dtype=np.int64)
    touched = np.asarray(touched, dtype=bool)
    lengths = np.asarray(lengths, dtype=np.int64)
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
    if len(a) == 0:
        return nothing
    d = new[a] * new[b] - old[a] * old[b]
    c = ((old[a] == 0) | (old[b] == 0)).astype(np.int64)
    ids, code = np.unique(media, return_inverse=True)
    code = code.reshape(-1).astype(np.int64)
    width = len(ids)
    pair = np.concatenate((code[a] * width + code[b], code[b] * width + code[a]))
    d = np.concatenate((d, d))
    c = np.concatenate((c, c))
    order = np.argsort(pair)
    pair, d, c = pair[order], d[order], c[order]
    starts_pair = np.flatnonzero(np.concatenate(([True], pair[1:] != pair[:-1])))
    pair = pair[starts_pair]
    x = pair // width
    entries = np.empty(len(starts_pair), dtype=ROW)
    entries["j"] = ids[pair % width]
    entries["d"] = np.add.reduceat(d, starts_pair)
    entries["c"] = np.add.reduceat(c, starts_pair)
    bounds = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1], [True])))
    return ids[x[bounds[:-1]]], entries, bounds
