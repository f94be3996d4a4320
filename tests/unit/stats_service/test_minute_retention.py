"""Minute retention against brute force (no Kafka): once a partition's event time is past a
day's end by the retention, the day's minute detail is pruned; hour and day figures stay exact,
minute figures of pruned days are gone, and ranges over pruned days count whole hours (rounded
outwards). The expected answers model exactly that from the raw events."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from stats_service.rollups import BucketVersions, RollupCache
from stats_service.top_media import RollupRanker
from tests.support.stats_state import HEARTBEAT, Brute, Event, load, partition, random_events
from viewevents.state.store import StateStore

DAY, HOUR, MINUTE = 86_400, 3_600, 60
RETENTION_DAYS = 1
PARTS = [0, 1, 2]


class PrunedBrute:
    """Brute force over the kept events, knowing which days each partition pruned: the days
    wholly older than its highest event time minus the retention."""

    def __init__(self, partitioned: dict[int, list[Event]]) -> None:
        self.kept = Brute(partitioned, RETENTION_DAYS * DAY).kept
        self.cut = {
            p: (max(e.seconds for e in evs) - RETENTION_DAYS * DAY) // DAY * DAY
            for p, evs in partitioned.items()
            if evs
        }
        self.partition_of = {e.event_id: p for p, evs in partitioned.items() for e in evs}

    def pruned(self, e: Event) -> bool:
        return e.seconds // DAY * DAY < self.cut[self.partition_of[e.event_id]]

    def inside(self, e: Event, start: int, end: int) -> bool:
        if self.pruned(e):
            hour = e.seconds // HOUR * HOUR
            return hour < end and hour + HOUR > start
        return start <= e.seconds < end

    def top(self, start: int, end: int) -> dict[int, tuple[int, int, int]]:
        acc: dict[int, list] = defaultdict(lambda: [0, 0, set()])
        for e in self.kept:
            if self.inside(e, start, end):
                acc[e.media][0] += HEARTBEAT if e.kind == 2 else 0
                acc[e.media][1] += e.kind == 1
                acc[e.media][2].add(e.user)
        return {m: (v, s, len(u)) for m, (v, s, u) in acc.items()}

    def minute_trend(self, media: int, start: int, end: int) -> dict[int, list]:
        out: dict[int, list] = {}
        for e in self.kept:
            if e.media == media and start <= e.seconds < end and not self.pruned(e):
                b = out.setdefault(e.seconds // MINUTE * MINUTE, [0, 0, 0, 0, set()])
                b[0] += HEARTBEAT if e.kind == 2 else 0
                b[1] += e.kind == 1
                b[2] += e.kind == 3
                b[3] += e.kind == 4
                b[4].add(e.user)
        return {s: [*b[:4], len(b[4])] for s, b in out.items()}


def test_minute_detail_is_pruned_and_queries_round_pruned_days_to_hours(tmp_path: Path) -> None:
    rng = random.Random(21)
    events = random_events(rng, 4000, late_fraction=0.1)
    partitioned = partition(events, len(PARTS))
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    processor = StatsProcessor(HEARTBEAT, 0, versions, minute_retention_days=RETENTION_DAYS)
    loaded: dict[int, list[Event]] = {p: [] for p in partitioned}
    reader = StatsReader(store)
    low = min(e.seconds for e in events)
    high = max(e.seconds for e in events)
    for cut in (0.5, 1.0):  # cached rollups must notice the pruning of the second half
        more = {p: evs[len(loaded[p]) : int(len(evs) * cut)] for p, evs in partitioned.items()}
        load(store, more, rng, processor=processor)
        for p in loaded:
            loaded[p] += more[p]
        brute = PrunedBrute(loaded)
        assert any(brute.pruned(e) for e in brute.kept)  # the case under test happens
        full = Brute(loaded, RETENTION_DAYS * DAY)
        old = [e.seconds for e in brute.kept if brute.pruned(e)]
        for i in range(20):
            # Half the ranges start next to a pruned event, so that edges cut pruned hours.
            near = rng.choice(old) - rng.randint(0, 2 * HOUR) if i % 2 else rng.randint(low, high)
            start = near // MINUTE * MINUTE
            end = start + MINUTE * rng.choice([1, 13, 59, 61, 600, 1441, 3000])
            expected = brute.top(start, end)
            counts = reader.range_counts(PARTS, start, end)
            viewers = reader.range_viewers_all(PARTS, start, end)
            assert {m: (*counts[m], viewers[m]) for m in counts} == expected
            for column in (0, 1, 2):
                ranking = ranker.top(PARTS, start, end, column, 1000)
                got = dict(zip(ranking.media, ranking.values[:, column].tolist()))
                assert got == {m: v[column] for m, v in expected.items()}
            media = rng.choice(sorted(full.totals))
            assert reader.viewers(PARTS, media, start, end) == expected.get(media, (0, 0, 0))[2]
            some = np.asarray(sorted(expected)[:5], np.int64)
            assert ranker.viewers(PARTS, some, start, end).tolist() == [
                expected[m][2] for m in some.tolist()
            ]
            ranker.cache.versions.touch(0, DAY, np.asarray([start // DAY * DAY]))
            ranker.cache.versions.publish()  # a stale day: the page reads its items' bitmaps
            assert ranker.page_viewers(PARTS, some, start, end).tolist() == [
                expected[m][2] for m in some.tolist()
            ]
            assert reader.trend(PARTS, media, MINUTE, start, end) == brute.minute_trend(
                media, start, end
            )
            hour_start = start // HOUR * HOUR
            assert reader.trend(PARTS, media, HOUR, hour_start, hour_start + 30 * HOUR) == (
                full.trend(media, HOUR, hour_start, hour_start + 30 * HOUR)
            )
    store.close()


def test_pruned_state_is_the_same_whatever_the_batch_cuts(tmp_path: Path) -> None:
    """Replays after a crash may cut the stream differently: the state must not differ."""
    events = random_events(random.Random(5), 4000, late_fraction=0.2)
    # A gap of two days: a batch straddling it prunes days that it wrote to itself.
    events = [
        e if i < 2000 else replace(e, seconds=e.seconds + 2 * DAY) for i, e in enumerate(events)
    ]
    partitioned = partition(events, 2)
    dumps = []
    for cut_seed in (1, 2):
        store = StateStore(str(tmp_path / f"db{cut_seed}"))
        processor = StatsProcessor(HEARTBEAT, 0, minute_retention_days=RETENTION_DAYS)
        load(store, partitioned, random.Random(cut_seed), processor=processor)
        dumps.append(list(store.scan(b"\x00", b"\xff")))
        store.close()
    assert dumps[0] == dumps[1]
    short = [v for key, v in dumps[0] if key[2:3] == b"Q" and len(v) == 3]
    assert short  # days were pruned
