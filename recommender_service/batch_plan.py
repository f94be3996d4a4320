"""The pure steps of folding one partition batch into the recommender's statistics.

The processor reads what a batch needs (users' windows, view times stored outside windows, item
records), these functions say what changes, and the processor writes it. Nothing here does I/O
or knows a key, so the window and row bookkeeping can be tested on plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recommender_service.incremental import FlatWindows, update_window
from recommender_service.key_layout import ItemRecord

# A row is compacted when its deltas hold half as many entries as its base (amortised O(1)
# work per delta entry), at least this many, or when it has `row_max_deltas` chunks.
COMPACT_MIN_ENTRIES = 256

Window = tuple[tuple[int, ...], tuple[int, ...], bool]
"""A stored window: media most recent first, their view times, whether items fell out of it."""


def outside_lookups(
    per_user: dict[int, dict[int, int]], windows: dict[int, Window | None]
) -> list[tuple[int, int]]:
    """(user, media) pairs whose earlier view time may be stored outside the user's window:
    raised items not in a window that has lost items before."""
    lookups: list[tuple[int, int]] = []
    for user, added in per_user.items():
        window = windows.get(user)
        if window is None or not added or not window[2]:
            continue
        present = set(window[0])
        lookups.extend((user, m) for m in added if m not in present)
    return lookups


@dataclass
class WindowPlan:
    """What one partition batch does to its users' windows, and the item sums it implies."""

    new_users: int = 0
    seen_only: list[int] = field(default_factory=list)
    """New users with no view time yet: stored empty, so they count in N."""
    windows: list[tuple[int, list[int], list[int], bool]] = field(default_factory=list)
    """(user, media, view times, has evicted) of every window to store."""
    evicted: list[tuple[int, int, int]] = field(default_factory=list)
    """(user, media, view time) that fell out of a window in this batch."""
    item_deltas: dict[int, list[int]] = field(default_factory=dict)
    """Per item: [dS, dQ, dn] of this partition."""
    flat: FlatWindows = field(default_factory=FlatWindows)
    """The updated windows end to end, for `pair_deltas`."""


def plan_windows(
    per_user: dict[int, dict[int, int]],
    windows: dict[int, Window | None],
    outside: dict[tuple[int, int], int],
    cap: int,
) -> WindowPlan:
    """Move each user's raised items to the front of their window and account for the change.

    `windows` holds every batch user's stored window (None: a user never seen), `outside` the
    view times found by `outside_lookups` (the processor deletes those entries: they are back in
    the window, and re-stored below if they fall out again)."""
    plan = WindowPlan()
    deltas = plan.item_deltas
    for user, added in per_user.items():
        window = windows.get(user)
        if window is None:
            plan.new_users += 1
            if not added:
                plan.seen_only.append(user)
                continue
            window = ((), (), False)
        elif not added:
            continue
        media, w, has_evicted = window
        mine = {m: outside[(user, m)] for m in added if (user, m) in outside} if has_evicted else {}
        update = update_window(media, w, added, mine, cap)
        plan.evicted.extend((user, item, value) for item, value in update.evicted)
        plan.windows.append((user, update.media, update.new, has_evicted or bool(update.evicted)))
        for item, old, new in update.changes:
            acc = deltas.get(item)
            if acc is None:
                acc = deltas[item] = [0, 0, 0]
            acc[0] += new - old
            acc[1] += new * new - old * old
            acc[2] += old == 0
        plan.flat.add(update)
    return plan


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
    return record.deltas > max_deltas or record.delta_entries >= max(
        record.base_entries // 2, COMPACT_MIN_ENTRIES
    )


def compacted(record: ItemRecord, base_entries: int) -> None:
    """The row is now one base of `base_entries` entries and no deltas."""
    record.deltas = 0
    record.base_entries = base_entries
    record.delta_entries = 0
