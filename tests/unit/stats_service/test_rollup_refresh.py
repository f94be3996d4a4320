"""Cached rollups brought up to date from the keys a batch changed (no Kafka), against brute
force over the same events: entries cached, batches landing that touch some media of a cached
bucket (late events into old buckets, media never seen before), queries again; a batch that
lands while a refresh is reading; the change log's versions, overflow and unknown changes; and
the day-viewer merge against a rebuild from scratch."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stats_service import key_layout, rollups
from stats_service.aggregation import Columns
from stats_service.processor import StatsProcessor
from stats_service.rollups import (
    BucketVersions,
    DayLayers,
    DayViewers,
    RollupCache,
    day_layers,
    day_viewers,
    find_pairs,
    merge_day_rows,
    refreshed_day,
    updated_day_viewers,
)
from stats_service.top_media import STARTS, VIEW_TIME, VIEWERS, RollupRanker
from tests.support.stats_state import BASE, HEARTBEAT, Brute, Event, load, partition
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction

PARTITIONS = 3
DAY, HOUR = 86_400, 3_600
# Fixed ranges, queried again and again so that their rollups stay cached between batches:
# whole days, whole hours, ragged minutes at both ends, a range inside one hour.
RANGES = [
    (BASE, BASE + 2 * DAY),
    (BASE + 5 * HOUR, BASE + 29 * HOUR),
    (BASE + 3 * HOUR + 17 * 60, BASE + DAY + 7 * HOUR + 41 * 60),
    (BASE + DAY + 2 * HOUR + 10 * 60, BASE + DAY + 2 * HOUR + 50 * 60),
]


def events_in(
    rng: random.Random, count: int, first: int, media: int, users: int, days: int = 2
) -> list[Event]:
    """Events at random times of the first `days` days (the ranges' two), ids from `first` on."""
    return [
        Event(
            f"e{first + i}",
            rng.randint(1, media),
            rng.randint(1, users),
            rng.choice([1, 2, 2, 2, 3, 4]),
            BASE + rng.randrange(days * DAY),
        )
        for i in range(count)
    ]


def check(ranker: RollupRanker, brute: Brute, rng: random.Random) -> None:
    """Every range, every metric, and the page viewers of a few items, against brute force."""
    parts = list(range(PARTITIONS))
    for start, end in RANGES:
        expected = brute.top(start, end)
        for column in (VIEW_TIME, STARTS, VIEWERS):
            keep = rng.choice([1, 3, 10, len(expected) + 1])
            ranking = ranker.top(parts, start, end, column, keep)
            order = sorted(expected, key=lambda m: (-expected[m][column], m))
            assert ranking.media == order[:keep], (start, end, column)
            assert ranking.more == (len(expected) > keep)
            for media, row in zip(ranking.media, ranking.values.tolist()):
                assert row[:2] == list(expected[media][:2])
                if column == VIEWERS:
                    assert row[2] == expected[media][2]
        some = np.asarray(sorted(expected)[:9], np.int64)
        want = [expected[m][2] for m in some.tolist()]
        assert ranker.viewers(parts, some, start, end).tolist() == want
        assert ranker.page_viewers(parts, some, start, end).tolist() == want


def apply(store: StateStore, processor: StatsProcessor, events: list[Event]) -> None:
    """One committed batch per partition touched, published as the consumer does."""
    txn = Transaction(store)
    for p, evs in partition(events, PARTITIONS).items():
        if evs:
            rows = ((e.media, e.user, e.kind, e.seconds) for e in evs)
            processor.apply_columns(p, Columns.from_tuples(rows), txn)
    txn.commit()
    processor.committed()


@pytest.mark.parametrize(
    "seed, log_keys, whole_days",
    [(1, 1 << 16, True), (2, 1 << 16, True), (3, 60, True), (4, 1 << 16, False)],
)
def test_refreshed_rollups_match_brute_force_as_batches_land(
    tmp_path: Path, seed: int, log_keys: int, whole_days: bool
) -> None:
    """(A log of 60 keys overflows within a batch or two: refreshes and reloads mix. Without
    `whole_days`, as when whole days' viewer rows would not fit the cache, page viewers come
    from per-item rows.)"""
    rng = random.Random(seed)
    events = events_in(rng, 2500, 0, media=20, users=50)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions(log_keys)
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    if not whole_days:
        ranker._viewer_days_fit = lambda partitions, days, load=True: False  # type: ignore[method-assign]
    load(store, partition(events, PARTITIONS), rng, processor=processor)
    check(ranker, Brute(partition(events, PARTITIONS), 0), rng)
    loads = ranker.cache.loads
    held = ranker._day_viewers(0, BASE).base  # a reader holding an entry while batches land
    held_copy = [held.media.copy(), held.user.copy(), held.minute_key.copy()]
    for step in range(8):
        # A few events: known media and users, media and users never seen before (from the
        # third step on), some in buckets cached long ago.
        media = 20 if step < 2 else 20 + step
        for _ in range(1 + step % 3):  # one to three versions behind: all of them count
            more = events_in(rng, rng.choice([1, 5, 40]), len(events), media, 50 + 5 * step)
            apply(store, processor, more)
            events += more
        check(ranker, Brute(partition(events, PARTITIONS), 0), rng)
    assert ranker.cache.refreshes > 0
    # Nearly every entry was brought up to date from its changed keys, not reloaded: only
    # buckets first touched by the later batches (hours without events before) are loaded.
    if log_keys > 1000:
        assert ranker.cache.loads - loads < ranker.cache.refreshes
    items = [key for key in ranker.cache._entries if key[0].startswith("viewers of ")]
    assert bool(items) != whole_days
    # Copy on write: the entry the reader held was never changed in place.
    for now, then in zip([held.media, held.user, held.minute_key], held_copy):
        assert np.array_equal(now, then)


def test_long_range_page_viewers_from_per_item_days_as_batches_land(tmp_path: Path) -> None:
    """A page's viewers over ranges of several days, when whole days' viewer rows do not fit:
    each item's users of each whole day (kept per item and day, refreshed from the changed
    pairs, and united over blocks of days) and its rows of the edge days, against brute force
    while batches land (late events into old days, new items and users, a day whose change is
    not described)."""
    rng = random.Random(11)
    days = 7
    events = events_in(rng, 3000, 0, media=15, users=60, days=days)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions(1 << 16)
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    ranker._viewer_days_fit = lambda partitions, days, load=True: False  # type: ignore[method-assign]
    load(store, partition(events, PARTITIONS), rng, processor=processor)
    parts = list(range(PARTITIONS))
    ranges = [
        (BASE + 2 * DAY, BASE + 6 * DAY + 60),  # its whole days are cached first:
        (BASE, BASE + days * DAY),  # the days loaded in one read here straddle them
        (BASE + 3 * HOUR + 17 * 60, BASE + 5 * DAY + 7 * HOUR + 41 * 60),  # ragged both ends
        (BASE + DAY + 59 * 60, BASE + 5 * DAY),
    ]

    def check_pages() -> None:
        brute = Brute(partition(events, PARTITIONS), 0)
        for start, end in ranges:
            expected = brute.top(start, end)
            some = np.asarray(sorted(rng.sample(sorted(expected), 8)), np.int64)
            want = [expected[m][2] for m in some.tolist()]
            assert ranker.page_viewers(parts, some, start, end).tolist() == want, (start, end)

    check_pages()
    loads = ranker.cache.loads
    for step in range(6):
        media = 15 if step < 2 else 15 + step
        more = events_in(rng, rng.choice([1, 5, 40]), len(events), media, 60 + 5 * step, days)
        apply(store, processor, more)
        events += more
        if step == 3:  # a change not described key by key: that day's entries are reloaded
            versions.touch(1, DAY, np.asarray([BASE + 2 * DAY]))
            versions.publish()
        check_pages()
    entries = [key for key in ranker.cache._entries if key[0].startswith("users of ")]
    assert any(key[1] >= 0 and key[2] == DAY for key in entries)  # an item's day
    assert any(key[1] == -1 and key[2] > DAY for key in entries)  # a block of its days
    assert ranker.cache.refreshes > 0
    assert ranker.cache.loads - loads < ranker.cache.refreshes


def test_item_users_refresh_adds_and_drops_users() -> None:
    entry = rollups.ItemUsers(np.array([3, 5, 9], np.int64))
    changed = np.array([1, 5, 9, 12], np.int64)
    stored = np.array([True, False, True, True])
    assert rollups.updated_item_users(entry, changed, stored).users.tolist() == [1, 3, 9, 12]
    assert entry.users.tolist() == [3, 5, 9]  # copy on write
    assert entry.rows == 3 and entry.nbytes == 24 + rollups.ITEM_ENTRY_OVERHEAD


class _LandingStore:
    """The store, except that the first multi-get after `arm` first lands a batch (a batch
    committed and published while a refresh is reading)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self.landing: Callable[[], None] | None = None

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        landing, self.landing = self.landing, None
        if landing is not None:
            landing()
        return self._store.get_many(keys)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_batch_landing_during_a_refresh_is_not_missed(tmp_path: Path) -> None:
    """The refresh reads the version and the changed keys before the state: a batch published
    while it reads (on media the refresh does not re-read) leaves the entry behind, and the next
    query must refresh again and count it."""
    rng = random.Random(9)
    events = events_in(rng, 1500, 0, media=20, users=50)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions(log_keys=1 << 16)
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    landing = _LandingStore(store)
    ranker = RollupRanker(landing, RollupCache(versions, 64 << 20))  # type: ignore[arg-type]
    load(store, partition(events, PARTITIONS), rng, processor=processor)
    parts = list(range(PARTITIONS))
    start, end = BASE, BASE + DAY  # one whole day: one day rollup per partition
    ranker.top(parts, start, end, VIEWERS, 5)  # cached
    seconds = BASE + 5 * HOUR + 30
    first = [Event("x1", 3, 7, 2, seconds)]  # an item the refresh re-reads
    second = [Event(f"x{2 + i}", 77, 100 + i, 2, seconds) for i in range(60)]  # a new item
    apply(store, processor, first)
    landing.landing = lambda: apply(store, processor, second)
    ranker.top(parts, start, end, VIEWERS, 5)  # refreshes with `first`; `second` lands
    assert landing.landing is None  # it did land during that query's reads
    events += first + second
    expected = Brute(partition(events, PARTITIONS), 0).top(start, end)
    ranking = ranker.top(parts, start, end, VIEWERS, 3)
    assert ranking.media == sorted(expected, key=lambda m: (-expected[m][2], m))[:3]
    assert ranking.media[0] == 77  # 60 new viewers, more than any other item has
    assert ranking.values[0].tolist() == list(expected[77])
    assert ranker.viewers(parts, np.array([3, 77]), start, end).tolist() == [
        expected[3][2],
        expected[77][2],
    ]


def test_change_log_versions_overflow_and_unknown_changes() -> None:
    versions = BucketVersions(log_keys=64)
    at = np.array([0, 0, 3600], np.int64)
    versions.note(0, 3600, at, np.array([5, 6, 5], np.int64))
    assert versions.version(0, 3600, 0) == 0  # noted, not yet published
    assert versions.since(0, 3600, 0, 0)[0] == 0
    versions.publish()
    versions.note(0, 3600, at[:1], np.array([9], np.int64))
    versions.publish()
    current, changes = versions.since(0, 3600, 0, 0)
    assert current == 2 and changes is not None and changes.media.tolist() == [5, 6, 9]
    current, changes = versions.since(0, 3600, 0, 1)
    assert current == 2 and changes is not None and changes.media.tolist() == [9]
    assert versions.since(0, 3600, 3600, 0)[1].media.tolist() == [5]  # type: ignore[union-attr]
    assert len(versions.since(0, 3600, 0, 2)[1]) == 0  # type: ignore[arg-type]
    # Viewer rows of a day: (media, user) pairs, distinct and sorted.
    day = np.array([0, 0, 0], np.int64)
    versions.note(1, 86_400, day, np.array([4, 2, 4]), np.array([8, 9, 8]))
    versions.publish()
    _, changes = versions.since(1, 86_400, 0, 0)
    assert changes is not None
    assert (changes.viewer_media.tolist(), changes.viewer_user.tolist()) == ([2, 4], [9, 8])
    # A change not described key by key: the log cannot bring older entries up to date.
    versions.touch(0, 3600, at[:1])
    versions.publish()
    assert versions.since(0, 3600, 0, 2) == (3, None)
    versions.note(0, 3600, at[:1], np.array([1], np.int64))
    versions.publish()
    assert versions.since(0, 3600, 0, 3)[1].media.tolist() == [1]  # type: ignore[union-attr]
    # Overflow: the oldest changes are dropped, and entries that needed them are reloaded.
    for n in range(20):
        versions.note(0, 3600, np.array([7200], np.int64), np.array([n], np.int64))
        versions.publish()
    assert versions.since(0, 3600, 7200, 0)[1] is None
    current, changes = versions.since(0, 3600, 7200, 17)
    assert current == 20 and changes is not None and changes.media.tolist() == [17, 18, 19]
    assert versions.bytes <= 64 * 16
    # No log at all: every change reloads.
    off = BucketVersions(log_keys=0)
    off.note(0, 3600, at[:1], np.array([1], np.int64))
    off.publish()
    assert off.since(0, 3600, 0, 0) == (1, None)


def _rows(rng: np.random.Generator, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """A stored value (random form: minute list, bitmap, pruned hour mask) per pair."""
    out = {}
    for pair in pairs:
        form = rng.integers(0, 5)
        if form == 0:
            out[pair] = rng.integers(0, 256, 3, dtype=np.uint8).tobytes()
        elif form == 1:
            out[pair] = rng.integers(0, 256, key_layout.BITMAP_BYTES, dtype=np.uint8).tobytes()
        else:
            minutes = np.unique(rng.integers(0, 1440, rng.integers(1, 12)))
            out[pair] = minutes.astype("<u2").tobytes()
    return out


def _built(rows: dict[tuple[int, int], bytes]) -> DayViewers:
    pairs = sorted(rows)
    media = np.array([m for m, _ in pairs], np.int64)
    user = np.array([u for _, u in pairs], np.int64)
    return day_viewers(media, user, [rows[p] for p in pairs])


def _assert_same(a: DayViewers, b: DayViewers) -> None:
    for field in ("media", "user", "hours", "minute_key", "minute_bits"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist(), field


@pytest.mark.parametrize("seed", range(6))
def test_day_viewers_merge_equals_a_rebuild(seed: int) -> None:
    """Rows rewritten, rows added (new media, new users, before, between and after the old
    ones), rows gone: the merged rollup equals one built from the final rows."""
    rng = np.random.default_rng(seed)
    pairs = {(int(m), int(u)) for m, u in rng.integers(1, 30, (60, 2))}
    pairs.add((2**62, 1))  # huge ids sort right
    rows = _rows(rng, sorted(pairs))
    old = _built(rows)
    changed = sorted(
        {p for p in pairs if rng.random() < 0.3}
        | {(int(m), int(u)) for m, u in rng.integers(0, 40, (rng.integers(0, 15), 2))}
    )
    after = dict(rows)
    after.update(_rows(rng, changed))
    for p in changed[: len(changed) // 5]:  # some are gone (nothing stored any more)
        after.pop(p)
    media = np.array([m for m, _ in changed], np.int64)
    user = np.array([u for _, u in changed], np.int64)
    fresh = _built({p: after[p] for p in changed if p in after})
    _assert_same(updated_day_viewers(old, media, user, fresh), _built(after))
    empty = _built({})
    _assert_same(updated_day_viewers(empty, media, user, fresh), fresh)
    _assert_same(updated_day_viewers(old, media[:0], user[:0], empty), old)


def _flat(entry: DayLayers) -> DayViewers:
    """A layered day rollup's live rows as one."""
    keep = np.ones(entry.base.rows, bool) if entry.dead is None else ~entry.dead
    return merge_day_rows(entry.base, keep, entry.delta)


@pytest.mark.parametrize("seed", range(4))
def test_layered_day_refreshes_equal_a_rebuild(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refreshes one after another (some pairs changed again, new pairs, pairs gone), with the
    delta merged into a new base now and then: the live rows equal a rebuild each time."""
    monkeypatch.setattr(rollups, "COMPACT_SHARE", 4)  # compact once delta > base / 4
    monkeypatch.setattr(rollups, "COMPACT_MIN_ROWS", 0)
    rng = np.random.default_rng(seed)
    rows = _rows(rng, sorted({(int(m), int(u)) for m, u in rng.integers(1, 40, (300, 2))}))
    entry = day_layers(_built(rows))
    compactions = 0
    for _ in range(12):
        changed = sorted({(int(m), int(u)) for m, u in rng.integers(1, 45, (25, 2))})
        rows.update(_rows(rng, changed))
        for p in changed[:3]:
            rows.pop(p)
        media = np.array([m for m, _ in changed], np.int64)
        user = np.array([u for _, u in changed], np.int64)
        fresh = _built({p: rows[p] for p in changed if p in rows})
        before = entry
        entry = refreshed_day(entry, media, user, fresh)
        compactions += entry.dead is None and before.dead is not None
        _assert_same(_flat(entry), _built(rows))
    assert compactions > 0


def test_find_pairs() -> None:
    media = np.array([1, 1, 1, 2, 5, 5, 9], np.int64)
    user = np.array([3, 4, 8, 1, 2, 7, 1], np.int64)
    want_media = np.array([1, 1, 1, 2, 3, 5, 5, 9, 9, 0], np.int64)
    want_user = np.array([3, 5, 8, 1, 1, 2, 9, 1, 0, 3], np.int64)
    at = find_pairs(media, user, want_media, want_user)
    assert at.tolist() == [0, -1, 2, 3, -1, 4, -1, 6, -1, -1]
    one = np.array([4, 4, 4], np.int64)  # one item's rows
    at = find_pairs(one, np.array([2, 5, 9]), np.array([4, 4, 4, 3, 4]), np.array([5, 6, 9, 5, 1]))
    assert at.tolist() == [1, -1, 2, -1, -1]
    none = np.zeros(0, np.int64)
    assert find_pairs(none, none, want_media, want_user).tolist() == [-1] * 10


def _by_bits(values: list[bytes]) -> tuple[list[int], list[int], list[int]]:
    """Hour masks, minute keys and minute words decoded a bit at a time (reference)."""
    bits = np.unpackbits(key_layout.minute_bitmaps(values), axis=1, bitorder="little")
    hours, keys, words = [], [], []
    for row, day in enumerate(bits.reshape(len(values), 24, 60).tolist()):
        mask = 0
        for hour, minutes in enumerate(day):
            word = sum(1 << m for m, bit in enumerate(minutes) if bit)
            if word:
                mask |= 1 << hour
                keys.append(row * 24 + hour)
                words.append(word)
        hours.append(mask)
    return hours, keys, words


@pytest.mark.parametrize("seed", range(4))
def test_day_viewers_from_minute_lists_bitmaps_and_hour_masks(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Day rollups read minute lists directly (no bitmap round trip): the same hour masks and
    minute words as a bit-by-bit decoding, every stored form mixed in one chunk, across chunk
    boundaries, and chunks of one form only."""
    monkeypatch.setattr(rollups, "VIEWER_CHUNK", 13)
    rng = np.random.default_rng(seed)
    values = list(_rows(rng, [(0, n) for n in range(70)]).values())
    values[5] = np.arange(0, 1440, 17).astype("<u2").tobytes()  # 85 minutes, every hour
    values[6] = np.array([59, 60, 119, 1439], "<u2").tobytes()  # hour edges
    values[20:33] = [np.array([n], "<u2").tobytes() for n in range(13)]  # a chunk of lists
    values[33:46] = [bytes([255]) * key_layout.BITMAP_BYTES] * 13  # a chunk of bitmaps
    media = np.arange(len(values), dtype=np.int64)
    found = day_viewers(media, media, values)
    hours, keys, words = _by_bits(values)
    assert found.hours.tolist() == hours
    assert found.minute_key.tolist() == keys
    assert found.minute_bits.tolist() == words


def test_a_day_bucket_is_refreshed_when_its_viewer_rows_change_a_lot() -> None:
    """A day's ranking rows (one per media) and its viewer rows (one per viewer-day) change
    together: a bucket rollup must weigh only the ranking rows changed, or a day with more new
    viewer-days than media would be reloaded at every ranking."""
    from stats_service.rollups import BucketRollup, Changes, Entry
    from stats_service.top_media import _ranking_rows

    versions = BucketVersions()
    cache = RollupCache(versions, 1 << 20)
    rows = BucketRollup(np.arange(10), np.zeros((10, 3), np.int64))
    refreshed: list[Changes] = []

    def refresh(entry: Entry, changes: Changes) -> Entry:
        refreshed.append(changes)
        return entry

    cache.get("bucket", 0, DAY, 0, lambda: rows, refresh, _ranking_rows)
    day = np.zeros(200, np.int64)
    versions.note(0, DAY, day[:1], np.array([3]))
    versions.note(0, DAY, day, np.arange(200), np.arange(200))
    versions.publish()
    assert cache.cheap("bucket", 0, DAY, 0)
    cache.get("bucket", 0, DAY, 0, lambda: rows, refresh, _ranking_rows)
    assert (cache.loads, cache.refreshes) == (1, 1)
    assert refreshed[0].media.tolist() == [3] and len(refreshed[0].viewer_media) == 0


def test_a_ranking_larger_than_the_cache_keeps_hitting_the_part_that_fits() -> None:
    """Eight rollups per ranking, room for five: the second pass finds the five kept (plain
    least-recently-used had evicted each before its next use, and reloaded all eight), and a
    different ranking afterwards takes the room of entries it does not use."""
    entry = rollups.BucketRollup(np.zeros(100, np.int64), np.zeros((100, 3), np.int64))
    cache = rollups.RollupCache(rollups.BucketVersions(), 5 * entry.nbytes)
    loaded: list[int] = []

    def load(hour: int) -> Callable[[], rollups.Entry]:
        def made() -> rollups.Entry:
            loaded.append(hour)
            return entry

        return made

    def ranking(hours: range) -> int:
        before = len(loaded)
        cache.new_round()
        for hour in hours:
            assert cache.get("bucket", 0, 3600, 3600 * hour, load(hour)) is entry
        return len(loaded) - before

    assert ranking(range(8)) == 8
    assert ranking(range(8)) == 3  # five hits
    assert cache.bytes <= cache.budget
    assert ranking(range(100, 105)) == 5  # another ranking: the old entries make room
    assert ranking(range(100, 105)) == 0
    assert ranking(range(8)) == 8 and ranking(range(8)) == 3


def test_an_items_missing_days_read_at_once_match_days_read_one_by_one(tmp_path: Path) -> None:
    """The days of a block without an entry are read with one scan over the block and filed
    per day; days already cached in between must neither be refiled nor leak into another
    day's users. Each day's users against the same day read on its own."""
    rng = random.Random(17)
    events = events_in(rng, 3000, 0, media=6, users=80, days=8)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions(1 << 16)
    load(
        store, partition(events, PARTITIONS), rng, processor=StatsProcessor(HEARTBEAT, 0, versions)
    )
    days = [BASE + d * DAY for d in range(8)]
    for media in range(1, 7):
        for p in range(PARTITIONS):
            batch = RollupRanker(store, RollupCache(versions, 64 << 20))
            for day in days[2:4] + days[5:6]:  # cached first: gaps inside the read
                batch._item_users(p, day, media)
            batch._load_item_days(p, media, days)
            alone = RollupRanker(store, RollupCache(versions, 64 << 20))
            for day in days:
                entry = batch.cache._entries[(f"users of {media}", p, DAY, day)][1]
                assert isinstance(entry, rollups.ItemUsers)
                expected = alone._item_users(p, day, media).users
                assert entry.users.tolist() == expected.tolist(), (media, p, day)
    store.close()


def test_stale_entries_of_many_buckets_refreshed_with_one_read_match_fresh_loads(
    tmp_path: Path,
) -> None:
    """Hour and day rollups of every partition, a day's viewer rows and items' viewer rows of
    a day, all cached, then a batch changes some of each: brought up to date together, they
    are read with one multi-get per kind, and each equals the same bucket loaded afresh."""
    rng = random.Random(23)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions(1 << 16)
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    apply(store, processor, events_in(rng, 1500, 0, media=12, users=60))
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    buckets = [(p, HOUR, BASE + h * HOUR) for p in range(PARTITIONS) for h in range(48)]
    buckets += [(p, DAY, BASE + d * DAY) for p in range(PARTITIONS) for d in range(2)]
    items = [2, 5, 7, 11]
    ranker._buckets(buckets)
    ranker.viewers(list(range(PARTITIONS)), np.asarray(items, np.int64), BASE, BASE + 2 * DAY)
    ranker._items_day_viewers(range(PARTITIONS), [BASE, BASE + DAY], items)
    apply(store, processor, events_in(rng, 40, 1500, media=12, users=60))
    reads: list[int] = []
    get_many = store.get_many

    def counted(keys: list[bytes]) -> list[bytes | None]:
        reads.append(len(keys))
        return get_many(keys)

    store.get_many = counted  # type: ignore[method-assign]
    refreshes = ranker.cache.refreshes
    buckets_now = ranker._buckets(buckets)
    assert len(reads) == 1 and ranker.cache.refreshes > refreshes  # several, one read
    fresh = RollupRanker(store, RollupCache(versions, 64 << 20))
    for (p, size, start), entry in zip(buckets, buckets_now):
        loaded = fresh._load_bucket(p, size, start)
        got = sorted(zip(entry.slots.tolist(), entry.values.tolist()))
        want = sorted(zip(loaded.slots.tolist(), loaded.values.tolist()))
        ids = ranker.cache.media.ids
        assert [(ids[s], v) for s, v in got] == [(fresh.cache.media.ids[s], v) for s, v in want]
    reads.clear()
    items_now = ranker._items_day_viewers(range(PARTITIONS), [BASE, BASE + DAY], items)
    assert len(reads) == 1
    at = iter(items_now)
    for p in range(PARTITIONS):
        for day in (BASE, BASE + DAY):
            for media in items:
                _assert_same(_flat(next(at)), _flat(fresh._item_viewers(p, day, media)))
    reads.clear()
    ranker.viewers(list(range(PARTITIONS)), np.asarray(items, np.int64), BASE, BASE + 2 * DAY)
    assert len(reads) == 1
    for p in range(PARTITIONS):  # whole days' viewer rows, as `viewers` refreshed them
        for day in (BASE, BASE + DAY):
            refreshed = ranker.cache._entries[("viewers", p, DAY, day)][1]
            assert isinstance(refreshed, DayLayers)
            _assert_same(_flat(refreshed), _flat(fresh._day_viewers(p, day)))
    store.close()


def test_keys_of_many_refreshes_packed_at_once_match_keys_built_one_by_one() -> None:
    """Runs of rows under their own prefixes (several partitions' bucket reads in one
    multi-get): each key is its run's prefix, the biased start and the big-endian columns."""
    import struct

    prefixes = [key_layout.rank_prefix(p, HOUR) for p in (0, 3, 7)]
    counts = [2, 0, 3]
    starts = np.array([-5, 0, BASE, BASE + HOUR, 2**40], np.int64)
    media = np.array([1, 2**62, 3, 0, 9], np.int64)
    keys = key_layout.pack_keys_of(prefixes, counts, [starts, media], (True, False))
    owners = [0, 0, 2, 2, 2]
    expected = [
        prefixes[o] + struct.pack(">Q", (s + 2**63) % 2**64) + struct.pack(">Q", m)
        for o, s, m in zip(owners, starts.tolist(), media.tolist())
    ]
    assert keys == expected
    with pytest.raises(ValueError):
        key_layout.pack_keys_of([b"ab", b"abc"], [1, 1], [media[:2]], (False,))


def test_one_items_viewers_without_loading_whole_days_match_brute_force(tmp_path: Path) -> None:
    """GetMediaTrend's unique viewers from the rollup cache: for one item the days' viewer
    rollups of every item are not loaded (only the item's own entries are), and the count is
    exact over whole days, ragged edges and a range inside one hour, as batches land."""
    rng = random.Random(29)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions(1 << 16)
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    events = events_in(rng, 2000, 0, media=15, users=70, days=3)
    apply(store, processor, events)
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    parts = list(range(PARTITIONS))
    ranges = [*RANGES, (BASE, BASE + 3 * DAY)]
    for step in range(3):
        brute = Brute(partition(events, PARTITIONS), 0)
        for start, end in ranges:
            for media in (1, 4, 9, 15, 99):
                item = np.array([media], np.int64)
                found = ranker.page_viewers(parts, item, start, end, load_days=False)
                assert found.tolist() == [brute.viewers(media, start, end)], (step, media)
        assert not any(key[0] == "viewers" for key in ranker.cache._entries)
        more = events_in(rng, 150, 2000 + 150 * step, media=15, users=70, days=3)
        apply(store, processor, more)
        events += more
    assert ranker.cache.refreshes > 0
    store.close()


def test_runs_of_re_read_keys_find_each_refresh_its_stored_rows() -> None:
    """Each refresh's keys and its rows among the stored values, against counting key by key
    (empty runs, runs with no stored key, all stored)."""
    from stats_service.top_media import _runs

    rng = np.random.default_rng(3)
    lengths = [0, 3, 1, 0, 5, 2, 4]
    stored = rng.random(sum(lengths)) < 0.6
    stored[1:4] = False
    row = key = 0
    for length, (keys, rows) in zip(lengths, _runs(lengths, stored), strict=True):
        assert (keys.start, keys.stop) == (key, key + length)
        count = int(sum(stored[key : key + length]))
        assert (rows.start, rows.stop) == (row, row + count)
        key, row = key + length, row + count
