"""The pure steps of folding one partition batch into the recommender's statistics.

The processor reads what a batch needs (users' windows, view times stored outside windows, item
records), these functions say what changes, and the processor writes it. Nothing here does I/O
or knows a key, so the window and row bookkeeping can be tested on plain values. The work is
done on numpy columns for the whole batch (`plan_batch`): no Python work per event, per item of
a window or per pair; `plan_windows` is the same plan over plain dicts, for reading and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from recommender_service.incremental import Raised
from recommender_service.key_layout import ItemRecord, StoredWindows

# A row's base is rewritten (a major compaction) when its deltas hold half as many entries as
# the base (amortised O(1) work per delta entry), at least this many. A row that reaches
# `row_max_deltas` chunks before that has only its delta chunks merged into one (a minor
# compaction, whose cost is that of the deltas, not of the base).
COMPACT_MIN_ENTRIES = 256

Window = tuple[tuple[int, ...], tuple[int, ...], bool]
"""A stored window: media most recent first, their view times, whether items fell out of it."""

Count = TypeVar("Count", int, np.ndarray)


def locate(raised: Raised, stored: StoredWindows) -> np.ndarray:
    """For each raised (user, item): its index in the stored windows' flat columns, or -1 when
    the item is not in the user's window."""
    slot = np.full(len(raised.media), -1, dtype=np.int64)
    if len(stored.media) == 0 or len(raised.media) == 0:
        return slot
    owner = np.repeat(np.arange(len(stored.lengths)), stored.lengths)
    ids, code = np.unique(np.concatenate((stored.media, raised.media)), return_inverse=True)
    code = code.reshape(-1).astype(np.int64)
    width = len(ids)
    stored_key = owner * width + code[: len(stored.media)]
    raised_key = raised.user * width + code[len(stored.media) :]
    order = np.argsort(stored_key)
    at = np.minimum(np.searchsorted(stored_key[order], raised_key), len(order) - 1)
    found = stored_key[order[at]] == raised_key
    slot[found] = order[at[found]]
    return slot


def outside_mask(raised: Raised, stored: StoredWindows, slot: np.ndarray) -> np.ndarray:
    """Raised (user, item) whose earlier view time may be stored outside the user's window:
    not in a window that has lost items before."""
    return np.asarray((slot < 0) & stored.has_evicted[raised.user])


@dataclass
class BatchPlan:
    """What one partition batch does to its users' windows and item sums, as numpy columns."""

    new_users: int
    seen_only: np.ndarray
    """Users (ids) new in this batch with no view time yet: stored empty, so they count in N."""
    window_users: np.ndarray
    """Users (ids) whose window is stored anew, with the windows laid end to end below."""
    has_evicted: np.ndarray
    lengths: np.ndarray
    media: np.ndarray
    new: np.ndarray
    """View time of each window item after the batch."""
    old: np.ndarray
    """View time of each window item before the batch."""
    touched: np.ndarray
    """Whether the batch raised the window item."""
    evicted_users: np.ndarray
    """(user, media, w) that fell out of a window in this batch."""
    evicted_media: np.ndarray
    evicted_w: np.ndarray
    items: np.ndarray
    """Items whose sums change (sorted), with their [dS, dQ, dn] of this partition."""
    ds: np.ndarray
    dq: np.ndarray
    dn: np.ndarray


def plan_batch(
    raised: Raised, stored: StoredWindows, slot: np.ndarray, outside: np.ndarray, cap: int
) -> BatchPlan:
    """Move each user's raised items to the front of their window (most recent first), keep the
    rest in order, cut at `cap`, and account for the change.

    `slot` is `locate`'s answer; `outside` the earlier view time of each raised item found
    outside its window (0 when none: never watched). The processor deletes those entries: they
    are back in the window, and re-stored if they fall out again."""
    users = len(raised.users)
    old_raised = outside.copy()
    old_raised[slot >= 0] = stored.w[slot[slot >= 0]]
    new_raised = old_raised + raised.count
    has_raised = np.zeros(users, dtype=bool)
    has_raised[raised.user] = True
    known = stored.known
    new_users = int((~known).sum())
    seen_only = raised.users[~known & ~has_raised]

    # Stored items that stay as they were: not raised, in windows that change.
    owner = np.repeat(np.arange(users), stored.lengths)
    position = np.arange(len(owner)) - np.repeat(stored.starts, stored.lengths)
    kept = has_raised[owner]
    kept[slot[slot >= 0]] = False
    kept_at = np.flatnonzero(kept)
    user = np.concatenate((raised.user, owner[kept_at]))
    group = np.concatenate((np.zeros(len(slot), np.int64), np.ones(len(kept_at), np.int64)))
    rank = np.concatenate((-raised.last, position[kept_at]))
    order = np.lexsort((rank, group, user))
    user = user[order]
    media = np.concatenate((raised.media, stored.media[kept_at]))[order]
    new = np.concatenate((new_raised, stored.w[kept_at]))[order]
    old = np.concatenate((old_raised, stored.w[kept_at]))[order]
    touched = (group == 0)[order]
    window_users, first, sizes = np.unique(user, return_index=True, return_counts=True)
    place = np.arange(len(user)) - np.repeat(first, sizes)
    inside = place < cap
    out = ~inside

    items, where = np.unique(raised.media, return_inverse=True)
    where = where.reshape(-1)
    ds = np.zeros(len(items), dtype=np.int64)
    dq = np.zeros(len(items), dtype=np.int64)
    dn = np.zeros(len(items), dtype=np.int64)
    np.add.at(ds, where, new_raised - old_raised)
    np.add.at(dq, where, new_raised * new_raised - old_raised * old_raised)
    np.add.at(dn, where, (old_raised == 0).astype(np.int64))
    return BatchPlan(
        new_users=new_users,
        seen_only=seen_only,
        window_users=raised.users[window_users],
        has_evicted=stored.has_evicted[window_users] | (sizes > cap),
        lengths=np.minimum(sizes, cap),
        media=media[inside],
        new=new[inside],
        old=old[inside],
        touched=touched[inside],
        evicted_users=raised.users[user[out]],
        evicted_media=media[out],
        evicted_w=new[out],
        items=items,
        ds=ds,
        dq=dq,
        dn=dn,
    )


# --- the same plan over plain dicts (reading, tests) --------------------------------------------


def _columns(
    per_user: dict[int, dict[int, int]], windows: dict[int, Window | None]
) -> tuple[Raised, StoredWindows]:
    users = list(per_user)
    user, media, count, last = [], [], [], []
    for k, added in enumerate(per_user.values()):
        for recency, (item, waypoints) in enumerate(added.items()):
            user.append(k)
            media.append(item)
            count.append(waypoints)
            last.append(recency)
    stored = [windows.get(u) for u in users]
    raised = Raised(
        np.asarray(users, np.int64),
        np.asarray(user, np.int64),
        np.asarray(media, np.int64),
        np.asarray(count, np.int64),
        np.asarray(last, np.int64),
        np.unique(np.asarray(media, np.int64)),
    )
    windows_flat = StoredWindows(
        np.array([w is not None for w in stored], dtype=bool),
        np.array([w is not None and w[2] for w in stored], dtype=bool),
        np.array([0 if w is None else len(w[0]) for w in stored], dtype=np.int64),
        np.asarray([m for w in stored if w for m in w[0]], np.int64),
        np.asarray([x for w in stored if w for x in w[1]], np.int64),
    )
    return raised, windows_flat


def outside_lookups(
    per_user: dict[int, dict[int, int]], windows: dict[int, Window | None]
) -> list[tuple[int, int]]:
    """(user, media) pairs whose earlier view time may be stored outside the user's window:
    raised items not in a window that has lost items before."""
    raised, stored = _columns(per_user, windows)
    mask = outside_mask(raised, stored, locate(raised, stored))
    return list(
        zip(raised.users[raised.user[mask]].tolist(), raised.media[mask].tolist(), strict=True)
    )


@dataclass
class WindowPlan:
    """`BatchPlan` as plain values."""

    new_users: int = 0
    seen_only: list[int] = field(default_factory=list)
    windows: list[tuple[int, list[int], list[int], bool]] = field(default_factory=list)
    """(user, media, view times, has evicted) of every window to store."""
    evicted: list[tuple[int, int, int]] = field(default_factory=list)
    """(user, media, view time) that fell out of a window in this batch."""
    item_deltas: dict[int, list[int]] = field(default_factory=dict)
    """Per item: [dS, dQ, dn] of this partition."""


def plan_windows(
    per_user: dict[int, dict[int, int]],
    windows: dict[int, Window | None],
    outside: dict[tuple[int, int], int],
    cap: int,
) -> WindowPlan:
    """`plan_batch` over dicts: per user the waypoints added per item (in last-waypoint order),
    every batch user's stored window (None: a user never seen), and the view times found by
    `outside_lookups`."""
    raised, stored = _columns(per_user, windows)
    found = [
        outside.get((u, m), 0)
        for u, m in zip(raised.users[raised.user].tolist(), raised.media.tolist(), strict=True)
    ]
    plan = plan_batch(raised, stored, locate(raised, stored), np.asarray(found, np.int64), cap)
    bounds = np.cumsum(plan.lengths).tolist()
    starts = [0, *bounds][:-1]
    return WindowPlan(
        new_users=plan.new_users,
        seen_only=plan.seen_only.tolist(),
        windows=[
            (u, plan.media[a:b].tolist(), plan.new[a:b].tolist(), bool(f))
            for u, a, b, f in zip(
                plan.window_users.tolist(), starts, bounds, plan.has_evicted, strict=True
            )
        ],
        evicted=list(
            zip(
                plan.evicted_users.tolist(),
                plan.evicted_media.tolist(),
                plan.evicted_w.tolist(),
                strict=True,
            )
        ),
        item_deltas={
            item: [ds, dq, dn]
            for item, ds, dq, dn in zip(
                plan.items.tolist(),
                plan.ds.tolist(),
                plan.dq.tolist(),
                plan.dn.tolist(),
                strict=True,
            )
        },
    )


def compaction_due(
    deltas: Count, delta_entries: Count, base_entries: Count, max_deltas: int
) -> np.ndarray:
    """Whether rows (ints or arrays) are due for a compaction of either kind, counting the
    chunk just added: more than `max_deltas` chunks, or `base_due`."""
    return np.asarray((deltas > max_deltas) | base_due(delta_entries, base_entries))


def base_due(delta_entries: Count, base_entries: Count) -> np.ndarray:
    """Whether rows' deltas hold half their base (at least COMPACT_MIN_ENTRIES entries): then
    the base is rewritten with them (a major compaction); a row due only by its chunk count has
    just its delta chunks merged (minor). Rewriting a base of thousands of entries for every
    `max_deltas` small chunks was most of the consumer's time with small batches (profiled at
    2M events of 20k users x 2k media: 1,188 base entries rewritten for 371 delta entries)."""
    return np.asarray(delta_entries >= np.maximum(base_entries // 2, COMPACT_MIN_ENTRIES))


def add_item_deltas(records: dict[int, ItemRecord], deltas: dict[int, list[int]]) -> None:
    """Add a partition's [dS, dQ, dn] to its item records."""
    for item, (ds, dq, dn) in deltas.items():
        record = records[item]
        record.s += ds
        record.q += dq
        record.n += dn


def add_row_chunk(record: ItemRecord, entries: int, max_deltas: int) -> bool:
    """Count one more delta chunk of `entries` entries on an item's row; True when the row is
    due for compaction into its base (then the chunk is merged rather than stored)."""
    record.deltas += 1
    record.delta_entries += entries
    return bool(
        compaction_due(record.deltas, record.delta_entries, record.base_entries, max_deltas)
    )


def compacted(record: ItemRecord, base_entries: int) -> None:
    """The row is now one base of `base_entries` entries and no deltas."""
    record.deltas = 0
    record.base_entries = base_entries
    record.delta_entries = 0
