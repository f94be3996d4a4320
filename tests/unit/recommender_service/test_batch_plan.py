"""The recommender's pure batch plan, checked by hand-worked examples (no RocksDB)."""

from __future__ import annotations

from recommender_service.batch_plan import (
    COMPACT_MIN_ENTRIES,
    Window,
    add_item_deltas,
    add_row_chunk,
    compacted,
    outside_lookups,
    plan_windows,
)
from recommender_service.key_layout import ItemRecord


def test_a_new_user_without_views_is_only_counted() -> None:
    plan = plan_windows({7: {}}, {7: None}, {}, cap=3)
    assert plan.new_users == 1 and plan.seen_only == [7] and plan.windows == []
    assert plan.item_deltas == {}


def test_an_existing_user_without_views_changes_nothing() -> None:
    plan = plan_windows({7: {}}, {7: ((1,), (2,), False)}, {}, cap=3)
    assert plan.new_users == 0 and plan.seen_only == [] and plan.windows == []


def test_raised_items_move_to_the_front_and_the_tail_is_evicted() -> None:
    # Window (most recent first): 1 (w=2), 2 (w=1), 3 (w=5); the batch adds 2 to item 3 and
    # 1 to a new item 4 (4's waypoint is the last one). Cap 3: item 2 falls out.
    stored: dict[int, Window | None] = {9: ((1, 2, 3), (2, 1, 5), False)}
    plan = plan_windows({9: {3: 2, 4: 1}}, stored, {}, cap=3)
    assert plan.windows == [(9, [4, 3, 1], [1, 7, 2], True)]
    assert plan.evicted == [(9, 2, 1)]
    # dS = new - old, dQ = new^2 - old^2, dn = 1 when old was 0
    assert plan.item_deltas == {3: [2, 49 - 25, 0], 4: [1, 1, 1]}


def test_view_time_stored_outside_the_window_is_looked_up_and_continued() -> None:
    per_user = {9: {2: 1}}
    windows: dict[int, Window | None] = {9: ((1,), (4,), True)}  # item 2 fell out earlier with w=3
    assert outside_lookups(per_user, windows) == [(9, 2)]
    plan = plan_windows(per_user, windows, {(9, 2): 3}, cap=2)
    assert plan.windows == [(9, [2, 1], [4, 4], True)]
    assert plan.item_deltas == {2: [1, 16 - 9, 0]}
    assert outside_lookups(per_user, {9: ((1,), (4,), False)}) == []  # nothing ever fell out


def test_item_deltas_add_to_records() -> None:
    records = {5: ItemRecord(s=10, q=50, n=3)}
    add_item_deltas(records, {5: [2, 24, 1]})
    assert (records[5].s, records[5].q, records[5].n) == (12, 74, 4)


def test_rows_compact_by_chunk_count_or_by_entries() -> None:
    record = ItemRecord(base_entries=10_000)
    assert [add_row_chunk(record, 1, max_deltas=3) for _ in range(4)] == [False] * 3 + [True]
    compacted(record, 10_004)
    assert (record.deltas, record.base_entries, record.delta_entries) == (0, 10_004, 0)
    small = ItemRecord(base_entries=0)
    assert not add_row_chunk(small, COMPACT_MIN_ENTRIES - 1, max_deltas=32)
    assert add_row_chunk(small, 1, max_deltas=32)  # reached the minimum entries
    big = ItemRecord(base_entries=4 * COMPACT_MIN_ENTRIES)
    assert not add_row_chunk(big, 2 * COMPACT_MIN_ENTRIES - 1, max_deltas=32)
    assert add_row_chunk(big, 1, max_deltas=32)  # deltas hold half the base
