"""Stats aggregation and queries against an independent brute-force count (no Kafka).

Events go through the real processor into a real RocksDB store, in random batch cuts over
several partitions; every figure read back is compared with plain Python sets and sums over the
same events. Nothing here reuses the service's own arithmetic for the expected values.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from aiokafka import TopicPartition

from stats_service import processor as processor_module
from stats_service import reader as reader_module
from stats_service import request_parsing
from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from tests.support.request_fields import Span, Time, TopFields, TrendFields
from tests.support.stats_state import BASE, HEARTBEAT, Brute, load, partition, random_events
from viewevents.consumer import ExactlyOnceConsumer
from viewevents.state.store import StateStore
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import view_event_pb2

SIZES = {"minute": 60, "hour": 3600, "day": 86400}


def check_everything(
    reader: StatsReader, brute: Brute, parts: list[int], rng: random.Random, span: tuple[int, int]
) -> None:
    for media, t in brute.totals.items():
        got = reader.totals(parts, media)
        assert got is not None
        assert (
            got.view_time,
            got.starts,
            got.stops,
            got.ends,
            got.uniques,
            got.first,
            got.last,
        ) == (
            t["view_time"],
            t["starts"],
            t["stops"],
            t["ends"],
            len(t["users"]),
            t["first"],
            t["last"],
        ), media
    assert reader.totals(parts, 10_000) is None
    low, high = span
    for _ in range(40):
        size = rng.choice(list(SIZES.values()))
        media = rng.choice(list(brute.totals))
        start = request_parsing.floor_to(rng.randint(low, high), size)
        end = start + size * rng.randint(1, 200 if size == 60 else 30)
        assert reader.trend(parts, media, size, start, end) == brute.trend(media, size, start, end)
        assert reader.viewers(parts, media, start, end) == brute.viewers(media, start, end)
    for _ in range(25):
        start = request_parsing.floor_to(rng.randint(low, high), 60)
        end = start + 60 * rng.choice([1, 59, 61, 600, 1439, 1441, 3000, 4 * 1440 + 7])
        expected = brute.top(start, end)
        counts = reader.range_counts(parts, start, end)
        viewers = reader.range_viewers_all(parts, start, end)
        assert set(counts) == set(expected)
        assert {m: (*counts[m], viewers[m]) for m in counts} == expected
        some = sorted(expected)[:5]
        assert reader.range_viewers_of(parts, some, start, end) == {m: expected[m][2] for m in some}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_state_matches_brute_force(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    events = random_events(rng, 3000)
    partitioned = partition(events, 3)
    store = StateStore(str(tmp_path / "db"))
    load(store, partitioned, rng)
    reader = StatsReader(store)
    span = (min(e.seconds for e in events) - 3600, max(e.seconds for e in events) + 3600)
    check_everything(reader, Brute(partitioned, 0), [0, 1, 2], rng, span)
    assert reader.stored_partitions() == [0, 1, 2]
    store.close()


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_hour_rows_written_in_small_chunks_match_brute_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """A batch's hour rows are read, merged and written a chunk at a time (bounded batch
    memory): chunk edges fall between the hours of one item and between items, and a chunk's
    minutes must land in its own rows."""
    monkeypatch.setattr(processor_module, "HOUR_ROWS_CHUNK", chunk)
    rng = random.Random(11 + chunk)
    events = random_events(rng, 3000)
    partitioned = partition(events, 2)
    store = StateStore(str(tmp_path / "db"))
    load(store, partitioned, rng)
    span = (min(e.seconds for e in events) - 3600, max(e.seconds for e in events) + 3600)
    check_everything(StatsReader(store), Brute(partitioned, 0), [0, 1], rng, span)
    store.close()


@pytest.mark.parametrize("few_rows", [256, 3])
def test_viewers_read_in_small_chunks_match_brute_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, few_rows: int
) -> None:
    """An item's viewer-days are decoded a few rows at a time (bounded query memory): chunk
    edges fall inside days and between partially and wholly covered days (edge days read with
    their minute sets, whole days as keys alone), each chunk row by row (`FEW_ROWS` 256) or
    with numpy (3)."""
    rng = random.Random(5)
    events = random_events(rng, 3000, media=4, users=80)
    partitioned = partition(events, 2)
    store = StateStore(str(tmp_path / "db"))
    load(store, partitioned, rng)
    brute = Brute(partitioned, 0)
    monkeypatch.setattr(reader_module, "VIEWER_ROWS", 7)
    monkeypatch.setattr(reader_module, "FEW_ROWS", few_rows)
    reader = StatsReader(store)
    low = min(e.seconds for e in events) - 3600
    high = max(e.seconds for e in events) + 3600
    checked = 0
    for _ in range(60):
        start = request_parsing.floor_to(rng.randint(low, high), 60)
        end = start + 60 * rng.choice([1, 61, 1439, 1441, 2 * 1440 + 30, 4 * 1440])
        for media in brute.totals:
            expected = brute.viewers(media, start, end)
            assert reader.viewers([0, 1], media, start, end) == expected, (media, start, end)
            checked += expected > 7  # more viewer-days than one chunk
    assert checked > 20
    store.close()


def test_retention_keeps_totals_but_not_old_buckets(tmp_path: Path) -> None:
    rng = random.Random(9)
    events = random_events(rng, 2500, late_fraction=0.15)
    partitioned = partition(events, 2)
    store = StateStore(str(tmp_path / "db"))
    processor = load(store, partitioned, rng, retention_days=2)
    brute = Brute(partitioned, 2 * 86400)
    assert len(brute.kept) < len(events)  # the case under test happens
    assert processor.events_outside_retention == len(events) - len(brute.kept)
    span = (min(e.seconds for e in events), max(e.seconds for e in events))
    check_everything(StatsReader(store), brute, [0, 1], rng, span)
    store.close()


def test_same_state_whatever_the_batch_cuts(tmp_path: Path) -> None:
    """Exactly-once relies on this: re-reading a stream after a crash may cut it differently."""
    events = random_events(random.Random(4), 1500, late_fraction=0.2)
    partitioned = partition(events, 2)
    dumps = []
    for cut_seed in (1, 2):
        store = StateStore(str(tmp_path / f"db{cut_seed}"))
        load(store, partitioned, random.Random(cut_seed), retention_days=1)
        dumps.append(list(store.scan(b"\x00", b"\xff")))
        store.close()
    assert dumps[0] == dumps[1]


@dataclass
class _Record:
    value: bytes
    offset: int
    timestamp: int


def test_duplicates_and_invalid_records_through_the_consumer(tmp_path: Path) -> None:
    """The shared consumer's de-duplication in front of the processor: first copy wins."""
    rng = random.Random(5)
    events = random_events(rng, 1200)
    stream = list(events)
    for _ in range(300):  # re-sent copies, later in the stream
        i = rng.randrange(len(events))
        stream.insert(rng.randint(i + 1, len(stream)), events[i])
    messages = [
        view_event_pb2.ViewEvent(
            event_id=e.event_id,
            media_id=e.media,
            user_id=e.user,
            event_type=cast(view_event_pb2.EventType, e.kind),  # Event.kind: the wire number
            event_time={"seconds": e.seconds},
        ).SerializeToString()
        for e in stream
    ]
    messages.insert(10, b"\xff\xffnot a protobuf")
    messages.insert(
        20,
        view_event_pb2.ViewEvent(
            event_id="neg",
            media_id=-1,
            user_id=1,
            event_type=view_event_pb2.EVENT_TYPE_STREAM_START,
        ).SerializeToString(),
    )
    store = StateStore(str(tmp_path / "db"))

    async def make() -> ExactlyOnceConsumer:  # aiokafka objects need a running loop
        return ExactlyOnceConsumer(
            bootstrap="127.0.0.1:1",
            topic="t",
            group_id="g",
            store=store,
            processor=StatsProcessor(HEARTBEAT, 0),
        )

    consumer = asyncio.run(make())
    for start in range(0, len(messages), 97):
        consumer.apply_batch(
            {
                TopicPartition("t", 0): [
                    _Record(m, start + i, BASE * 1000)
                    for i, m in enumerate(messages[start : start + 97])
                ]
            }
        )
    brute = Brute({0: events}, 0)
    reader = StatsReader(store)
    check_everything(reader, brute, [0], rng, (BASE, max(e.seconds for e in events)))
    store.close()


# --- pure query logic -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_tiles_cover_the_range_exactly_with_coarse_buckets(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        start = BASE + 60 * rng.randint(-3000, 3000)
        end = start + 60 * rng.randint(0, 6 * 1440)
        runs = request_parsing.tiles(start, end)
        covered = []
        for size, low, high in runs:
            assert low % size == 0 and high % size == 0 and low < high
            covered += list(range(low, high, 60))
        assert covered == list(range(start, end, 60))
        # No run of a finer size could have been merged into a whole coarser bucket.
        for size, low, high in runs:
            if size < 86400:
                coarser = 3600 if size == 60 else 86400
                assert high - low < 2 * coarser


def _ts(seconds: int, nanos: int = 0) -> Time:
    return {"seconds": seconds, "nanos": nanos}


def _reasons(violations: list) -> set[tuple[str, str]]:
    return {(v.field, v.reason) for v in violations}


LIMITS = request_parsing.Limits(max_trend_buckets=100, default_page_size=10, max_page_size=50)


def test_trend_arguments() -> None:
    ok, bad = request_parsing.parse_trend(
        pb.GetMediaTrendRequest(
            media_id=3,
            start_time=_ts(BASE + 61),
            end_time=_ts(BASE + 3600, 5),
            granularity=pb.GRANULARITY_MINUTE,
        ),
        LIMITS,
    )
    assert not bad and ok is not None
    assert (ok.start, ok.end, ok.size) == (BASE + 60, BASE + 3660, 60)  # rounded outwards
    minute, unspecified = pb.GRANULARITY_MINUTE, pb.GRANULARITY_UNSPECIFIED
    unnamed = cast(pb.Granularity, 9)  # a number the enum does not name
    cases: list[tuple[TrendFields, set[tuple[str, str]]]] = [
        (
            dict(media_id=0, granularity=minute, start_time=_ts(BASE), end_time=_ts(BASE)),
            {("media_id", "REQUIRED")},
        ),
        (
            dict(media_id=-4, granularity=minute, start_time=_ts(BASE), end_time=_ts(BASE)),
            {("media_id", "NOT_POSITIVE")},
        ),
        (
            dict(media_id=1, granularity=unspecified, start_time=_ts(BASE), end_time=_ts(BASE)),
            {("granularity", "REQUIRED")},
        ),
        (
            dict(media_id=1, granularity=unnamed, start_time=_ts(BASE), end_time=_ts(BASE)),
            {("granularity", "UNKNOWN_VALUE")},
        ),
        (
            dict(media_id=1, granularity=minute),
            {("start_time", "REQUIRED"), ("end_time", "REQUIRED")},
        ),
        (
            dict(media_id=1, granularity=minute, start_time=_ts(BASE), end_time=_ts(BASE - 1)),
            {("end_time", "INVALID_RANGE")},
        ),
        (
            dict(
                media_id=1, granularity=minute, start_time=_ts(BASE), end_time=_ts(BASE + 101 * 60)
            ),
            {("end_time", "TOO_MANY_BUCKETS")},
        ),
        (
            dict(media_id=1, granularity=minute, start_time=_ts(BASE), end_time=_ts(10**15)),
            {("end_time", "OUT_OF_RANGE")},
        ),
    ]
    for fields, expected in cases:
        parsed, violations = request_parsing.parse_trend(pb.GetMediaTrendRequest(**fields), LIMITS)
        assert parsed is None and _reasons(violations) == expected, fields
    exactly_max, bad = request_parsing.parse_trend(
        pb.GetMediaTrendRequest(
            media_id=1, granularity=minute, start_time=_ts(BASE), end_time=_ts(BASE + 100 * 60)
        ),
        LIMITS,
    )
    assert exactly_max is not None and not bad


def test_top_arguments_and_page_tokens() -> None:
    base = Span(start_time=_ts(BASE + 30), end_time=_ts(BASE + 7200))
    first, bad = request_parsing.parse_top(pb.ListTopMediaRequest(**base), LIMITS)
    assert first is not None and not bad
    assert (first.start, first.end, first.limit, first.offset, first.metric) == (
        BASE,
        BASE + 7200,
        10,
        0,
        pb.TOP_MEDIA_METRIC_VIEW_TIME,
    )
    token = request_parsing.encode_page_token(first.fingerprint, 20)
    again, bad = request_parsing.parse_top(
        pb.ListTopMediaRequest(
            **base, page_token=token, limit=7, metric=pb.TOP_MEDIA_METRIC_VIEW_TIME
        ),
        LIMITS,
    )
    assert again is not None and again.offset == 20 and again.limit == 7  # limit may change
    for change in (
        TopFields(metric=pb.TOP_MEDIA_METRIC_STARTS),
        TopFields(end_time=_ts(BASE + 7201)),
        TopFields(start_time=_ts(BASE)),
    ):
        fields: TopFields = {**base, **change}
        parsed, bad = request_parsing.parse_top(
            pb.ListTopMediaRequest(**fields, page_token=token), LIMITS
        )
        assert parsed is None and _reasons(bad) == {("page_token", "PAGE_TOKEN_MISMATCH")}
    for junk in (
        "x",
        "!!!",
        "e30",
        token[:-3],
        "A" * 600,
        request_parsing.encode_page_token(first.fingerprint, 0).replace("o", "p"),
    ):
        parsed, bad = request_parsing.parse_top(
            pb.ListTopMediaRequest(**base, page_token=junk), LIMITS
        )
        assert parsed is None and ("page_token", "INVALID_PAGE_TOKEN") in _reasons(bad), junk
    for limit, reason in ((-1, "OUT_OF_RANGE"), (51, "OUT_OF_RANGE")):
        parsed, bad = request_parsing.parse_top(pb.ListTopMediaRequest(**base, limit=limit), LIMITS)
        assert parsed is None and _reasons(bad) == {("limit", reason)}
    parsed, bad = request_parsing.parse_top(
        pb.ListTopMediaRequest(**base, metric=cast(pb.TopMediaMetric, 8)), LIMITS
    )
    assert parsed is None and _reasons(bad) == {("metric", "UNKNOWN_VALUE")}
    parsed, bad = request_parsing.parse_top(
        pb.ListTopMediaRequest(start_time=_ts(BASE + 5), end_time=_ts(BASE)), LIMITS
    )
    assert parsed is None and _reasons(bad) == {("end_time", "INVALID_RANGE")}


def test_rank_and_pages_are_total_and_stable() -> None:
    rng = random.Random(3)
    values = {
        m: (rng.randint(0, 5) * 30, rng.randint(0, 3), rng.randint(0, 4))
        for m in rng.sample(range(1, 500), 120)
    }
    for metric, column in ((1, 0), (2, 1), (3, 2)):
        ranked = request_parsing.rank(values, metric)
        expected = sorted(values, key=lambda m: (-values[m][column], m))
        assert ranked == expected
        seen: list[int] = []
        offset: int | None = 0
        while offset is not None:
            chunk, offset = request_parsing.page(ranked, offset, 13)
            seen += chunk
        assert seen == expected
