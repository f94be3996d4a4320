"""ListTopMedia from the in-memory rollups against brute force (no Kafka): every metric over
random unaligned ranges, with batches landing between queries so that cached rollups must be
noticed as stale, and a cache too small to hold them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from stats_service import key_layout, rollups, top_media
from stats_service.processor import StatsProcessor
from stats_service.rollups import (
    BucketVersions,
    RollupCache,
    distinct_per_owner,
    rows_of,
    top_slots,
)
from stats_service.top_media import STARTS, VIEW_TIME, VIEWERS, RollupRanker
from tests.support.stats_state import (
    HEARTBEAT,
    Brute,
    load,
    loaded_state,
    partition,
    random_events,
)
from viewevents.state.store import StateStore

PARTITIONS = 3


def expected_order(expected: dict[int, tuple[int, int, int]], column: int) -> list[int]:
    return sorted(expected, key=lambda m: (-expected[m][column], m))


def check_rankings(
    ranker: RollupRanker, brute: Brute, rng: random.Random, low: int, high: int, rounds: int
) -> None:
    parts = list(range(PARTITIONS))
    for _ in range(rounds):
        start = rng.randint(low, high) // 60 * 60
        end = start + 60 * rng.choice([1, 7, 59, 61, 600, 1439, 1441, 3000, 4 * 1440 + 7])
        expected = brute.top(start, end)
        for column in (VIEW_TIME, STARTS, VIEWERS):
            keep = rng.choice([1, 3, 10, max(1, len(expected)), len(expected) + 1, 1000])
            ranking = ranker.top(parts, start, end, column, keep)
            order = expected_order(expected, column)
            assert ranking.more == (len(expected) > keep)
            assert ranking.media == order[:keep], (start, end, column)
            got = ranking.values.tolist()
            for media, row in zip(ranking.media, got):
                assert row[:2] == list(expected[media][:2])  # whatever the metric
                if column == VIEWERS:
                    assert row[2] == expected[media][2]
        some = sorted(expected)[:7]
        viewers = ranker.viewers(parts, np.asarray(some, np.int64), start, end).tolist()
        assert viewers == [expected[m][2] for m in some]
        # A page's viewers: from the rollups (just loaded) or, when a day is stale, each
        # item's own bitmaps; the same counts either way.
        page = ranker.page_viewers(parts, np.asarray(some, np.int64), start, end).tolist()
        assert page == viewers
        ranker.cache.versions.touch(0, 86_400, np.asarray([start // 86_400 * 86_400]))
        ranker.cache.versions.publish()
        page = ranker.page_viewers(parts, np.asarray(some, np.int64), start, end).tolist()
        assert page == viewers


@pytest.mark.parametrize("seed, budget", [(1, 64 << 20), (2, 64 << 20), (3, 20_000)])
def test_rollup_rankings_match_brute_force_while_batches_land(
    tmp_path: Path, seed: int, budget: int
) -> None:
    rng = random.Random(seed)
    events = random_events(rng, 4000)
    partitioned = partition(events, PARTITIONS)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    ranker = RollupRanker(store, RollupCache(versions, budget))
    low = min(e.seconds for e in events)
    high = max(e.seconds for e in events)
    loaded: dict[int, list] = {p: [] for p in partitioned}
    for cut in (0.3, 0.6, 1.0):  # queries fill the cache, then more batches land
        more = {p: evs[len(loaded[p]) : int(len(evs) * cut)] for p, evs in partitioned.items()}
        load(store, more, rng, processor=processor)
        for p in loaded:
            loaded[p] += more[p]
        check_rankings(ranker, Brute(loaded, 0), rng, low, high, 12)
    if budget > 1 << 20:
        assert ranker.cache.hits > 0  # the later rounds did read cached rollups
    assert ranker.cache.bytes <= budget


def test_distinct_per_owner_and_top_slots() -> None:
    owner = np.array([0, 0, 1, 1, 1, 2])
    user = np.array([5, 5, 5, 6, 2**62, 7])  # a huge id takes the sorting branch
    assert distinct_per_owner(owner, user, 4).tolist() == [1, 3, 1, 0]
    assert distinct_per_owner(owner[:2], user[:2], 2).tolist() == [1, 0]
    sparse = np.array([5, 5, 5, 6, 10**7, 7])  # too sparse to mark: sorts codes
    assert distinct_per_owner(owner, sparse, 4).tolist() == [1, 3, 1, 0]
    values = np.array([3, 9, 9, 1, 9, 0])
    ids = np.array([10, 30, 20, 40, 25, 50])
    assert ids[top_slots(values, ids, 3)].tolist() == [20, 25, 30]
    assert ids[top_slots(values, ids, 1)].tolist() == [20]


@pytest.mark.parametrize("minute, more", [(40, True), (5, False)])
def test_items_seen_only_in_an_edge_hour_decide_whether_there_is_another_page(
    tmp_path: Path, minute: int, more: bool
) -> None:
    """Item 1 is in a whole hour of the range, items 2 to 4 only in the edge hour (2 and 3
    before the range, 4 inside it or not) and too small to be refined for the page: with a
    page of one, whether a next page exists depends on their minutes."""
    from stats_service.aggregation import Columns
    from viewevents.state.transaction import Transaction

    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    txn = Transaction(store)
    hour = 1_767_225_600
    events = [(1, user, 2, hour + 3600 + 600) for user in (7, 8, 9)]  # best by far
    events += [(2, 10, 2, hour + 300), (3, 11, 2, hour + 300)]  # edge hour, before the range
    events.append((4, 12, 2, hour + 60 * minute))  # edge hour: in the range or not
    processor.apply_columns(0, Columns.from_tuples(events), txn)
    txn.commit()
    processor.committed()
    ranker = RollupRanker(store, RollupCache(versions, 1 << 20))
    for column in (VIEW_TIME, STARTS, VIEWERS):
        ranking = ranker.top([0], hour + 1800, hour + 7200, column, 1)
        assert ranking.more is more
        assert ranking.media == [1]


def _day_viewers_by_bits(bitmaps: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decoding the rollup did before (a byte per bit of every row at once): reference."""
    bits = np.unpackbits(key_layout.minute_bitmaps(bitmaps), axis=1, bitorder="little")
    per_hour = bits.reshape(len(bitmaps), 24, 60)
    weights = np.left_shift(np.uint64(1), np.arange(60, dtype=np.uint64))
    words = (per_hour.astype(np.uint64) * weights).sum(axis=2, dtype=np.uint64).reshape(-1)
    keys = np.flatnonzero(words)
    hours = (per_hour.any(axis=2).astype(np.uint32) * rollups.HOUR_BITS).sum(axis=1)
    return hours.astype(np.uint32), keys, words[keys]


def test_day_viewers_decoded_in_chunks_match_a_bit_per_byte_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Day rollups are decoded a chunk of rows at a time with 64-bit words (bounded build
    memory, the soak's RSS growth): same hour masks and minute masks as bit by bit, across
    chunk boundaries, with pruned days' 3-byte hour masks among the rows."""
    monkeypatch.setattr(rollups, "VIEWER_CHUNK", 7)
    rng = np.random.default_rng(5)
    bitmaps: list[bytes] = []
    for n in range(40):
        if n % 9 == 4:
            bitmaps.append(rng.integers(0, 256, 3, dtype=np.uint8).tobytes())  # pruned day
            continue
        row = np.zeros(key_layout.BITMAP_BYTES, np.uint8)
        for minute in rng.integers(0, 1440, rng.integers(0, 30)):
            row[minute // 8] |= np.uint8(1 << (minute % 8))
        if n % 10 == 0:
            row[:] = 0xFF  # every minute
        elif n % 5 == 0:
            row[14] |= 0x80  # the last minute of the first pair of hours (bit 119)
        bitmaps.append(row.tobytes())
    media = np.arange(len(bitmaps), dtype=np.int64)
    user = media * 3
    found = rollups.day_viewers(media, user, bitmaps)
    hours, keys, words = _day_viewers_by_bits(bitmaps)
    assert found.media.tolist() == media.tolist() and found.user.tolist() == user.tolist()
    assert found.hours.tolist() == hours.tolist()
    assert found.minute_key.tolist() == keys.tolist()
    assert found.minute_bits.tolist() == words.tolist()
    whole = rollups.concat_day_viewers(
        [
            rollups.day_viewers(media[a : a + 11], user[a : a + 11], bitmaps[a : a + 11])
            for a in range(0, len(bitmaps), 11)
        ]
    )
    assert whole.minute_key.tolist() == keys.tolist()
    empty = rollups.day_viewers(media[:0], user[:0], [])
    assert len(empty.media) == 0 and len(empty.minute_key) == 0


def test_bucket_rollups_are_int32_only_where_every_number_fits_and_sum_exactly() -> None:
    """A rollup is kept as int32 when its numbers fit (half the cache bytes), else as int64; a
    ranking's sums over rollups of both kinds, and a refresh that mixes them, stay exact."""
    big = 2**31 + 7  # a day's view time of a very popular item, in seconds
    small = rollups.bucket_rollup(np.array([0, 3]), np.array([[60, 1, 1], [120, 2, 2]]))
    large = rollups.bucket_rollup(np.array([3, 4]), np.array([[big, 5, 4], [30, 1, 1]]))
    assert small.slots.dtype == np.int32 and small.values.dtype == np.int32
    assert large.slots.dtype == np.int32 and large.values.dtype == np.int64
    assert small.nbytes == 2 * 4 + 2 * 3 * 4
    sums = top_media._sum_rollups([small, large], 5)
    assert sums.tolist() == [
        [60, 1, 1, 1],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
        [120 + big, 7, 6, 2],
        [30, 1, 1, 1],
    ]
    [grown, same] = rollups.updated_buckets(
        [small, small],
        [np.array([3]), np.array([3])],
        [np.array([3]), np.array([3])],
        [np.array([[big, 3, 3]]), np.array([[9, 3, 3]])],
    )
    assert grown.values.dtype == np.int64 and same.values.dtype == np.int32
    assert sorted(map(tuple, same.values.tolist())) == [(9, 3, 3), (60, 1, 1)]
    assert sorted(map(tuple, np.column_stack([grown.slots, grown.values]).tolist())) == [
        (0, 60, 1, 1),
        (3, big, 3, 3),
    ]


def test_warmed_rollups_serve_exact_rankings_without_loading(tmp_path: Path) -> None:
    """Warming finds every day with data (newest first) and loads its bucket and viewer
    rollups; rankings inside those days then load nothing and still match brute force."""
    state = loaded_state(tmp_path, 21, 3000, PARTITIONS)
    store, rng = state.store, state.rng
    ranker = RollupRanker(store, RollupCache(state.versions, 64 << 20))
    parts = list(range(PARTITIONS))
    brute = Brute(state.partitioned, 0)
    days = ranker.days_with_data(parts)
    assert days == sorted({e.seconds // 86_400 * 86_400 for e in brute.kept}, reverse=True)
    for viewers in (False, True):
        for day in days:
            assert ranker.warm_day(parts, day, viewers)
    assert ranker.cache.loads == len(days) * PARTITIONS * (1 + 24 + 1)
    loads = ranker.cache.loads
    for _ in range(12):
        start = rng.randint(days[-1], days[0]) // 60 * 60
        end = min(start + 60 * rng.choice([61, 1439, 1441, 3000]), days[0] + 86_400)
        expected = brute.top(start, end)
        for column in (VIEW_TIME, STARTS, VIEWERS):
            ranking = ranker.top(parts, start, end, column, 5)
            assert ranking.media == expected_order(expected, column)[:5], (start, end, column)
            page = np.asarray(sorted(ranking.media), np.int64)
            viewers = ranker.page_viewers(parts, page, start, end).tolist()
            assert viewers == [expected[m][2] for m in page.tolist()]
    assert ranker.cache.loads == loads  # every rollup came from the warmed cache
    store.close()


def test_warming_stops_at_its_share_of_the_cache_and_keeps_the_newest_days(
    tmp_path: Path,
) -> None:
    state = loaded_state(tmp_path, 22, 3000, PARTITIONS)
    store = state.store
    budget = 30_000
    ranker = RollupRanker(store, RollupCache(state.versions, budget))
    parts = list(range(PARTITIONS))
    days = ranker.days_with_data(parts)
    warmed = 0
    while warmed < len(days) and ranker.warm_day(parts, days[warmed]):
        warmed += 1
    assert 0 < warmed < len(days)  # the case under test: not every day fits
    assert ranker.cache.bytes <= budget
    assert ranker.cache.loads == len(ranker.cache._entries)  # nothing warmed was evicted
    assert ranker.cache.current("bucket", 0, 86_400, days[0])  # the newest day is kept
    assert not ranker.cache.current("bucket", 0, 86_400, days[-1])
    store.close()


@pytest.mark.parametrize("edge_rows", [1, 3])
def test_edge_hours_read_in_small_batches_match_brute_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edge_rows: int
) -> None:
    """The edge hours' rows of all partitions are read together, EDGE_ROWS at a time: batch
    cuts fall between edges and inside one, and each row's minutes are its own edge's."""
    monkeypatch.setattr(top_media, "EDGE_ROWS", edge_rows)
    state = loaded_state(tmp_path, 30 + edge_rows, 3000, PARTITIONS)
    ranker = RollupRanker(state.store, RollupCache(state.versions, 64 << 20))
    seconds = [e.seconds for events in state.partitioned.values() for e in events]
    brute = Brute(state.partitioned, 0)
    check_rankings(ranker, brute, state.rng, min(seconds), max(seconds), 15)
    state.store.close()


def test_rows_of_against_a_scan() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        ids = np.sort(rng.integers(0, 30, rng.integers(0, 60)))
        wanted = np.unique(rng.integers(0, 35, rng.integers(0, 8)))
        rows, owner = rows_of(ids, wanted)
        expected = [(r, w) for w, m in enumerate(wanted.tolist()) for r in np.flatnonzero(ids == m)]
        assert list(zip(rows.tolist(), owner.tolist())) == expected


def test_minute_span_sums_match_each_rows_own_slice() -> None:
    rng = np.random.default_rng(6)
    for count in (0, 1, 7, 40):
        minutes = rng.integers(-5, 1000, (count, 60, 3)).astype(np.int32)
        first = rng.integers(0, 61, count)
        stop = np.maximum(first, rng.integers(0, 61, count))
        got = top_media.minute_span_sums(minutes, first, stop)
        for row in range(count):
            expected = minutes[row, first[row] : stop[row]].astype(np.int64).sum(axis=0)
            assert got[row].tolist() == expected.tolist()


def test_day_blocks_cover_each_day_once_in_aligned_power_of_two_blocks() -> None:
    day = 86_400
    for low in range(0, 70):
        for high in range(low, low + 70, 3):
            blocks = top_media.day_blocks(low * day, high * day)
            covered = [first // day + i for first, days in blocks for i in range(days)]
            assert covered == list(range(low, high))
            for first, days in blocks:
                assert days & (days - 1) == 0 and days <= top_media.MAX_BLOCK_DAYS
                assert (first // day) % days == 0
            assert len(blocks) <= 2 * max(1, (high - low).bit_length())


def test_long_rankings_from_blocks_of_days_match_brute_force_while_batches_land(
    tmp_path: Path,
) -> None:
    """Rankings over ranges of 5 to 25 days read whole days as blocks summed over days and
    partitions; a batch changing any day of a block (late events, weeks behind) makes the
    block current no longer, and the next ranking sums it again."""
    rng = random.Random(31)
    events = random_events(rng, 4000, late_fraction=0.3)
    partitioned = partition(events, PARTITIONS)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    parts = list(range(PARTITIONS))
    low = min(e.seconds for e in events) // 86_400 * 86_400
    high = max(e.seconds for e in events)
    loaded: dict[int, list] = {p: [] for p in partitioned}
    for cut in (0.5, 0.7, 0.85, 1.0):
        more = {p: evs[len(loaded[p]) : int(len(evs) * cut)] for p, evs in partitioned.items()}
        load(store, more, rng, processor=processor)
        for p in loaded:
            loaded[p] += more[p]
        brute = Brute(loaded, 0)
        for days in (5, 12, 25):
            start = rng.randrange(low - 2 * 86_400, max(low, high - days * 86_400)) // 60 * 60
            end = start + days * 86_400 + 60 * rng.randrange(1440)
            expected = brute.top(start, end)
            for column in (VIEW_TIME, STARTS, VIEWERS):
                ranking = ranker.top(parts, start, end, column, 6)
                assert ranking.media == expected_order(expected, column)[:6], (days, column)
                for media, row in zip(ranking.media, ranking.values.tolist()):
                    assert row[:2] == list(expected[media][:2])
                    if column == VIEWERS:
                        assert row[2] == expected[media][2]
    blocks = [key for key in ranker.cache._entries if key[0].startswith("days of ")]
    assert blocks and all(key[2] > 86_400 for key in blocks)
    store.close()


@pytest.mark.parametrize("seed", range(5))
def test_buckets_updated_together_match_each_updated_by_dictionary(seed: int) -> None:
    """Many entries (some empty, some with nothing changed) updated at once: each entry's rows
    equal its old rows as a dictionary with the changed keys dropped and the re-read ones put
    back (changed keys stored again, gone, or new to the entry)."""
    rng = np.random.default_rng(seed)
    span = int(rng.choice([50, 1 << 20]))  # marks table, or the sorted look-up
    entries, changed, slots, values, expected = [], [], [], [], []
    for _ in range(int(rng.integers(1, 40))):
        old = rng.choice(span, int(rng.integers(0, 30)), replace=False)
        rows = {int(s): tuple(rng.integers(0, 1000, 3).tolist()) for s in old}
        entries.append(rollups.bucket_rollup(old, np.array(list(rows.values())).reshape(-1, 3)))
        touched = rng.choice(span, int(rng.integers(0, 10)), replace=False)
        stored = touched[rng.random(len(touched)) < 0.7]
        fresh = {int(s): tuple(rng.integers(0, 2**33, 3).tolist()) for s in stored}
        changed.append(touched)
        slots.append(stored)
        values.append(np.array(list(fresh.values()), np.int64).reshape(-1, 3))
        after = {s: r for s, r in rows.items() if s not in set(touched.tolist())}
        after.update(fresh)
        expected.append(sorted((s, *r) for s, r in after.items()))
    for got, want in zip(rollups.updated_buckets(entries, changed, slots, values), expected):
        pairs = np.column_stack([got.slots.astype(np.int64), got.values.astype(np.int64)])
        assert sorted(map(tuple, pairs.tolist())) == want
        wide = bool(got.rows) and int(got.values.max()) > 2**31 - 1
        assert got.values.dtype == (np.int64 if wide else np.int32)
