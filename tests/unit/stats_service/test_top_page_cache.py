"""Finished ListTopMedia pages are reused only at exactly the offsets they were computed at:
the pure cache's rules, and the servicer's rankings against brute force while batches land
between repeated queries (a kept page must never be served once the state moved)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from stats_service import request_parsing
from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from stats_service.rollups import BucketVersions, RollupCache
from stats_service.servicer import StatsServicer
from stats_service.top_cache import ENTRY_OVERHEAD, PageCache, page_cache_bytes
from stats_service.top_media import RollupRanker
from tests.support.positions import caught_up_position
from tests.support.stats_state import HEARTBEAT, Brute, Event, load, partition, random_events
from viewevents.state.store import StateStore
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import view_event_pb2

PARTITIONS = 3


def test_pages_are_served_only_at_their_offsets_and_within_the_budget() -> None:
    cache: PageCache[str] = PageCache(3 * (100 + ENTRY_OVERHEAD))
    at = ((0, 5), (1, 7))
    cache.put(at, "a", "page a", 100)
    assert cache.get(at, "a") == "page a"
    assert cache.get(at, "b") is None
    moved = ((0, 5), (1, 8))  # one batch applied to partition 1
    assert cache.get(moved, "a") is None  # never the page of the older state
    assert len(cache) == 0 and cache.bytes == 0  # everything was dropped at once
    cache.put(at, "a", "late page of the old state", 100)  # a slow query finishing late
    assert cache.get(moved, "a") is None and cache.get(at, "a") is None
    for name in "bcde":
        cache.put(moved, name, name, 100)
    assert cache.get(moved, "b") is None  # least recently used went first
    assert [cache.get(moved, n) for n in "cde"] == ["c", "d", "e"]
    assert cache.bytes <= cache.budget
    cache.put(moved, "huge", "x", cache.budget)  # larger than the budget: not kept
    assert cache.get(moved, "huge") is None
    other = ((0, 5), (2, 1))  # other partitions (a new assignment): not comparable, moves on
    cache.put(other, "f", "f", 100)
    assert cache.get(other, "f") == "f" and cache.get(moved, "c") is None
    assert PageCache[str](0).get(at, "a") is None


class _Consumer:
    """Owns every partition, caught up; `positions` are set by the test as batches land."""

    def __init__(self) -> None:
        self.positions: dict[int, int] = {p: 0 for p in range(PARTITIONS)}

    def position(self) -> view_event_pb2.ConsumerPosition:
        return caught_up_position(self.positions)


def _expected(brute: Brute, start: int, end: int, metric: int, limit: int) -> list[tuple]:
    found = brute.top(start, end)
    column = request_parsing.METRIC_COLUMN[metric]
    order = sorted(found, key=lambda m: (-found[m][column], m))[:limit]
    return [(m, *found[m]) for m in order]


def test_a_kept_page_is_never_served_after_a_batch_was_applied(tmp_path: Path) -> None:
    rng = random.Random(7)
    events = random_events(rng, 3000)
    partitioned = partition(events, PARTITIONS)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    processor = StatsProcessor(HEARTBEAT, 0, versions)
    consumer = _Consumer()
    servicer = StatsServicer(
        StatsReader(store),
        consumer,
        request_parsing.Limits(),
        ranker=RollupRanker(store, RollupCache(versions, 64 << 20)),
        pages=PageCache(1 << 20),
    )
    low = min(e.seconds for e in events) // 60 * 60
    high = max(e.seconds for e in events)
    queries = [
        (low + rng.randrange(high - low) // 60 * 60, rng.choice([3600, 86_400, 3 * 86_400]))
        for _ in range(4)
    ] + [(low, high - low + 60)]
    loaded: dict[int, list[Event]] = {p: [] for p in partitioned}
    answers_changed = 0
    previous: dict[tuple, list[tuple]] = {}
    try:
        for cut in (0.2, 0.5, 0.51, 1.0):  # each cut: batches land, then repeated queries
            more = {p: evs[len(loaded[p]) : int(len(evs) * cut)] for p, evs in partitioned.items()}
            load(store, more, rng, processor=processor)
            for p in loaded:
                loaded[p] += more[p]
                consumer.positions[p] = len(loaded[p])  # the offsets move with the state
            brute = Brute(loaded, 0)
            hits = servicer.pages.hits
            for start, span in queries:
                for metric in (pb.TOP_MEDIA_METRIC_VIEW_TIME, pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS):
                    request = pb.ListTopMediaRequest(
                        start_time=timestamp_pb2.Timestamp(seconds=start),
                        end_time=timestamp_pb2.Timestamp(seconds=start + span),
                        metric=metric,
                        limit=5,
                    )
                    query, _ = request_parsing.parse_top(request, request_parsing.Limits())
                    assert query is not None
                    expected = _expected(brute, query.start, query.end, metric, 5)
                    for _ in range(2):  # computed, then (same offsets) from the kept pages
                        page = asyncio.run(
                            servicer._top_from_rollups(query, list(range(PARTITIONS)))
                        )
                        got = [
                            (m.media_id, m.view_time_seconds, m.starts, m.unique_viewers)
                            for m in page.media
                        ]
                        assert got == expected, (cut, start, span, metric)
                        assert [p.offset for p in page.position.partitions] == [
                            len(loaded[p]) for p in sorted(loaded)
                        ]
                        # A caller changing its answer never changes the kept page.
                        for entry in page.media:
                            entry.view_time_seconds += 1_000_000
                        page.position.Clear()
                    key = (start, span, metric)
                    answers_changed += key in previous and previous[key] != expected
                    previous[key] = expected
            assert servicer.pages.hits - hits == 2 * len(queries)  # every repeat was kept
        # The once-a-minute memory line names both caches with what they hold.
        assert servicer.ranker is not None
        memory = servicer.memory_bytes()
        assert memory == {"pages": servicer.pages.bytes, "rollups": servicer.ranker.cache.bytes}
        assert memory["pages"] > 0 and memory["rollups"] > 0
    finally:
        store.close()
    assert answers_changed > 0  # the test would see a stale page


@dataclass
class _Rankings:
    """A servicer over a loaded store whose rollup rankings are counted."""

    store: StateStore
    servicer: StatsServicer
    query: request_parsing.TopQuery
    expected: list[tuple]
    count: int = 0

    def page(self) -> asyncio.Future[pb.ListTopMediaResponse]:
        return asyncio.ensure_future(
            self.servicer._top_from_rollups(self.query, list(range(PARTITIONS)))
        )


def _counted_rankings(tmp_path: Path) -> _Rankings:
    rng = random.Random(11)
    events = random_events(rng, 2000)
    partitioned = partition(events, PARTITIONS)
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    load(store, partitioned, rng, processor=StatsProcessor(HEARTBEAT, 0, versions))
    consumer = _Consumer()
    consumer.positions = {p: len(evs) for p, evs in partitioned.items()}
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    servicer = StatsServicer(
        StatsReader(store),
        consumer,
        request_parsing.Limits(),
        ranker=ranker,
        pages=PageCache(1 << 20),
    )
    low = min(e.seconds for e in events) // 60 * 60
    request = pb.ListTopMediaRequest(
        start_time=timestamp_pb2.Timestamp(seconds=low + 1800),
        end_time=timestamp_pb2.Timestamp(seconds=low + 1800 + 86_400),
        metric=pb.TOP_MEDIA_METRIC_VIEW_TIME,
        limit=5,
    )
    query, _ = request_parsing.parse_top(request, request_parsing.Limits())
    assert query is not None
    expected = _expected(Brute(partitioned, 0), query.start, query.end, query.metric, 5)
    assert expected
    rankings = _Rankings(store, servicer, query, expected)
    rank = ranker.top

    def counted(*args: Any, **kwargs: Any) -> Any:
        rankings.count += 1
        return rank(*args, **kwargs)

    ranker.top = counted  # type: ignore[method-assign]
    return rankings


def _media(page: pb.ListTopMediaResponse) -> list[tuple]:
    return [(m.media_id, m.view_time_seconds, m.starts, m.unique_viewers) for m in page.media]


def test_identical_rankings_asked_at_once_are_computed_once(tmp_path: Path) -> None:
    """Eight screens ask for the same page at the same moment: one computation answers all of
    them exactly, and the first caller giving up does not take the page from the others."""
    rankings = _counted_rankings(tmp_path)
    servicer, query = rankings.servicer, rankings.query

    async def screens() -> list[pb.ListTopMediaResponse]:
        asked = [rankings.page() for _ in range(8)]
        await asyncio.sleep(0)  # every caller has asked
        asked[0].cancel()  # the first one gives up (its deadline)
        pages = await asyncio.gather(*asked[1:])
        with pytest.raises(asyncio.CancelledError):
            await asked[0]
        return pages

    async def everyone_gives_up() -> pb.ListTopMediaResponse:
        """While the scans are all busy, every caller gives up: the queued computation is
        cancelled (no dead work left behind), and the next caller computes afresh."""
        limit = request_parsing.Limits().max_concurrent_scans
        for _ in range(limit):
            await servicer._scans.acquire()
        asked = [rankings.page() for _ in range(3)]
        await asyncio.sleep(0)
        for caller in asked:
            caller.cancel()
        await asyncio.gather(*asked, return_exceptions=True)
        assert servicer._computing == {}
        for _ in range(limit):
            servicer._scans.release()
        return await servicer._top_from_rollups(query, list(range(PARTITIONS)))

    try:
        pages = asyncio.run(screens())
        assert rankings.count == 1
        servicer.pages = PageCache(0)  # nothing kept: the last call below must compute
        pages.append(asyncio.run(everyone_gives_up()))
    finally:
        rankings.store.close()
    assert rankings.count == 2  # the cancelled computation never ranked
    assert [_media(page) for page in pages] == [rankings.expected] * len(pages)
    assert servicer._computing == {}


def test_a_cancelled_computation_finishing_late_leaves_the_next_one_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caller of a page gave up, and its cancelled computation takes a while to wind
    down; meanwhile a new caller started a new computation. When the old one finally ends, the
    new one must stay registered: a third caller joins it instead of ranking again."""
    rankings = _counted_rankings(tmp_path)
    servicer = rankings.servicer
    servicer.pages = PageCache(0)  # nothing kept: every page is computed
    compute = servicer._rollup_page
    wound_down = asyncio.Event()
    calls = 0

    async def slow_to_cancel(*args: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 1:
            return await compute(*args)
        try:
            await asyncio.Event().wait()  # the first computation is only ever cancelled
        except asyncio.CancelledError:
            await wound_down.wait()
            raise
        raise AssertionError("unreachable")

    monkeypatch.setattr(servicer, "_rollup_page", slow_to_cancel)

    async def scenario() -> list[pb.ListTopMediaResponse]:
        first = rankings.page()
        await asyncio.sleep(0)
        (old,) = [flight.task for flight in servicer._computing.values()]
        first.cancel()
        await asyncio.wait([first])
        assert not old.done() and servicer._computing == {}  # the case under test
        limit = request_parsing.Limits().max_concurrent_scans
        for _ in range(limit):  # the new computation waits until the old one is gone
            await servicer._scans.acquire()
        second = rankings.page()
        await asyncio.sleep(0)
        wound_down.set()
        await asyncio.wait([old])
        for _ in range(3):
            await asyncio.sleep(0)  # the old task's done callbacks have run
        third = rankings.page()
        await asyncio.sleep(0)
        for _ in range(limit):
            servicer._scans.release()
        return list(await asyncio.gather(second, third))

    try:
        pages = asyncio.run(scenario())
    finally:
        rankings.store.close()
    assert rankings.count == 1  # the third caller joined the second's computation
    assert [_media(page) for page in pages] == [rankings.expected] * 2
    assert servicer._computing == {}


def test_pages_take_a_sixteenth_of_the_rollup_cache_by_default_and_never_over_half() -> None:
    mib = 1 << 20
    assert page_cache_bytes(20 * mib, -1) == 20 * mib // 16
    assert page_cache_bytes(20 * mib, 0) == 0
    assert page_cache_bytes(20 * mib, 1024) == mib
    assert page_cache_bytes(20 * mib, 1 << 20) == 10 * mib  # a huge setting: half, not all
