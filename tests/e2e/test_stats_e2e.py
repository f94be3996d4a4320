"""Stats service end to end: generated noisy file -> ingest service -> Kafka -> stats service.

Every media item's totals, a sample of trends at each granularity and complete top-N rankings
(each metric, every page) are compared with a brute-force count over the same file, computed
here from the parsed lines with the ingest service's validation and first-copy-wins
de-duplication. Helpers are shared with the crash test.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from google.protobuf import timestamp_pb2

from ingest_service.validation import Limits, validate_event
from tests.support import ServiceProcess, free_port, test_config
from viewevents.rpc.errors import field_violations_of
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2
from viewevents_client.uploads import CHANNEL_OPTIONS, upload
from viewevents_tools import settings_catalogue as settings

HEARTBEAT = 30
SIZES = {pb.GRANULARITY_MINUTE: 60, pb.GRANULARITY_HOUR: 3600, pb.GRANULARITY_DAY: 86400}


def generated_events(path: Path, count: int, seed: int, days: float = 3.0
                     ) -> list[view_event_pb2.ViewEvent]:
    """A noisy legacy file from viewevents_tools.generator, parsed as the CLI would: lines that cannot be
    represented are dropped client-side; the rest go to the ingest service, invalid or not."""
    from viewevents_client.event_files import iter_file
    from viewevents_tools.generator import generate

    generate(str(path), count, seed=seed, noise=0.05, days=days, users=5_000, media=800)
    return [parsed.event for _, parsed in iter_file(str(path)) if parsed.event is not None]


def accepted(events: Iterable[view_event_pb2.ViewEvent], config: settings.Config
             ) -> list[view_event_pb2.ViewEvent]:
    """What the stats service must count: valid by the ingest rules, first copy of an id."""
    limits = Limits(config.max_future_skew_seconds, config.max_event_age_days * 86400)
    now = time.time()
    seen: set[str] = set()
    out = []
    for event in events:
        if validate_event(event, now, limits) or event.event_id in seen:
            continue
        seen.add(event.event_id)
        out.append(event)
    return out


class Expected:
    """Brute-force answers over accepted events (no retention cut-off: the default)."""

    def __init__(self, events: list[view_event_pb2.ViewEvent]) -> None:
        self.rows = [(e.media_id, e.user_id, e.event_type, e.event_time.seconds) for e in events]
        self.by_media: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
        for row in self.rows:
            self.by_media[row[0]].append(row)

    def totals(self, media: int) -> tuple:
        rows = self.by_media[media]
        starts = sum(r[2] == 1 for r in rows)
        ends = sum(r[2] == 4 for r in rows)
        view_time = HEARTBEAT * sum(r[2] == 2 for r in rows)
        viewers = len({r[1] for r in rows})
        return (view_time, starts, sum(r[2] == 3 for r in rows), ends, viewers,
                ends / starts if starts else 0.0, view_time / viewers,
                min(r[3] for r in rows), max(r[3] for r in rows))

    def trend(self, media: int, size: int, start: int, end: int) -> tuple[list[tuple], int]:
        buckets: dict[int, list] = {}
        users = set()
        for _, user, kind, seconds in self.by_media[media]:
            if start <= seconds < end:
                b = buckets.setdefault(seconds - seconds % size, [0, 0, 0, 0, set()])
                b[0] += HEARTBEAT * (kind == 2)
                b[1] += kind == 1
                b[2] += kind == 3
                b[3] += kind == 4
                b[4].add(user)
                users.add(user)
        return [(s, *b[:4], len(b[4])) for s, b in sorted(buckets.items())], len(users)

    def top(self, start: int, end: int, metric: int) -> list[tuple]:
        acc: dict[int, list] = defaultdict(lambda: [0, 0, set()])
        for media, user, kind, seconds in self.rows:
            if start <= seconds < end:
                acc[media][0] += HEARTBEAT * (kind == 2)
                acc[media][1] += kind == 1
                acc[media][2].add(user)
        column = {pb.TOP_MEDIA_METRIC_VIEW_TIME: 0, pb.TOP_MEDIA_METRIC_STARTS: 1,
                  pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS: 2}[metric]
        values = {m: (v, s, len(u)) for m, (v, s, u) in acc.items()}
        order = sorted(values, key=lambda m: (-values[m][column], m))
        return [(m, i + 1, *values[m]) for i, m in enumerate(order)]


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for p in described[0]["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    return asyncio.run(_end_offsets(bootstrap, topic))


def wait_until_applied(stub: pb_grpc.StatsServiceStub, targets: dict[int, int], probe_media: int,
                       timeout: float = 120.0) -> view_event_pb2.ConsumerPosition:
    """The freshness protocol: poll until every partition's position reaches the end offsets
    observed after the upload."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=probe_media),
                                      timeout=5).position
            offsets = {p.partition: p.offset for p in last.partitions}
            if all(offsets.get(p, 0) >= end for p, end in targets.items()):
                return last
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
        time.sleep(0.2)
    raise TimeoutError(f"stats service did not reach {targets}; last position {last}")


def check_all_totals(stub: pb_grpc.StatsServiceStub, expected: Expected) -> None:
    for media in sorted(expected.by_media):
        s = stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=media), timeout=10).stats
        got = (s.view_time_seconds, s.starts, s.stops, s.ends, s.unique_viewers,
               s.completion_rate, s.average_view_time_seconds_per_viewer,
               s.first_event_time.seconds, s.last_event_time.seconds)
        assert got == pytest.approx(expected.totals(media)), media


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def services(tmp_path: Path, bootstrap: str, **overrides: object
             ) -> tuple[settings.Config, ServiceProcess, ServiceProcess]:
    config = test_config(bootstrap, ingest_address=f"127.0.0.1:{free_port()}",
                         stats_address=f"127.0.0.1:{free_port()}",
                         stats_state_dir=str(tmp_path / "stats-state"), **overrides)
    ingest = ServiceProcess("ingest_service", config, config.ingest_address,
                            tmp_path / "ingest.log")
    stats = ServiceProcess("stats_service", config, config.stats_address, tmp_path / "stats.log")
    return config, ingest, stats


def test_stats_match_brute_force(kafka_bootstrap: str, tmp_path: Path) -> None:
    events = generated_events(tmp_path / "views.jsonl", 150_000, seed=21)
    config, ingest, stats = services(tmp_path, kafka_bootstrap)
    ingest.start()
    stats.start()
    try:
        ingest.wait_serving()
        stats.wait_serving()
        with grpc.insecure_channel(config.ingest_address, options=CHANNEL_OPTIONS) as channel:
            summary = upload(channel, events, batch_size=5_000, timeout=300)
        good = accepted(events, config)
        assert summary.received == len(events) and summary.rejected > 0
        assert len(good) < summary.accepted  # duplicates were sent and must be dropped
        expected = Expected(good)
        targets = end_offsets(kafka_bootstrap, config.view_topic)
        assert sum(targets.values()) == summary.accepted
        with grpc.insecure_channel(config.stats_address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.StatsServiceStub(channel)
            position = wait_until_applied(stub, targets, good[0].media_id)
            assert position.caught_up
            assert position.event_time_watermark.seconds == max(r[3] for r in expected.rows)
            check_all_totals(stub, expected)
            check_trends(stub, expected, random.Random(3))
            check_top(stub, expected)
            check_errors(stub, max(expected.by_media) + 1)
    finally:
        stats.stop()
        ingest.stop()


def check_trends(stub: pb_grpc.StatsServiceStub, expected: Expected, rng: random.Random) -> None:
    low = min(r[3] for r in expected.rows)
    high = max(r[3] for r in expected.rows)
    popular = sorted(expected.by_media, key=lambda m: -len(expected.by_media[m]))
    media_sample = popular[:3] + rng.sample(popular, 5)
    for granularity, size in SIZES.items():
        for media in media_sample:
            start = rng.randint(low - 3600, high)
            length = {60: 1440 * 60, 3600: 80 * 3600, 86400: 5 * 86400}[size]
            end = start + rng.randint(1, length)
            reply = stub.GetMediaTrend(pb.GetMediaTrendRequest(
                media_id=media, start_time=_ts(start), end_time=_ts(end),
                granularity=granularity), timeout=30)
            first, last = start - start % size, -(-end // size) * size  # rounded outwards
            buckets, viewers = expected.trend(media, size, first, last)
            got = [(b.start_time.seconds, b.view_time_seconds, b.starts, b.stops, b.ends,
                    b.unique_viewers) for b in reply.buckets]
            assert got == buckets, (media, size, start, end)
            assert reply.unique_viewers == viewers
            assert reply.granularity == granularity and reply.position.caught_up
        full = stub.GetMediaTrend(pb.GetMediaTrendRequest(
            media_id=popular[0], start_time=_ts(low), end_time=_ts(low + 30 * size),
            granularity=granularity, include_empty_buckets=True), timeout=30)
        end = low + 30 * size  # not aligned: rounded up, so 31 buckets
        assert [b.start_time.seconds for b in full.buckets] == list(
            range(low - low % size, -(-end // size) * size, size))
        assert sum(b.starts for b in full.buckets) == sum(
            row[2] for row in expected.trend(popular[0], size, low - low % size,
                                             -(-end // size) * size)[0])


def check_top(stub: pb_grpc.StatsServiceStub, expected: Expected) -> None:
    low = min(r[3] for r in expected.rows)
    high = max(r[3] for r in expected.rows)
    day = 86400
    middle = low - low % day + day
    ranges = [(low, high + 1), (middle, middle + day), (middle + 3723, middle + day + 7 * 3600 + 42),
              (middle + 600, middle + 660)]
    for start, end in ranges:
        first, last = start - start % 60, -(-end // 60) * 60
        for metric in (pb.TOP_MEDIA_METRIC_VIEW_TIME, pb.TOP_MEDIA_METRIC_STARTS,
                       pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS):
            want = expected.top(first, last, metric)
            got: list[tuple] = []
            token = ""
            limit = 150
            while True:
                reply = stub.ListTopMedia(pb.ListTopMediaRequest(
                    start_time=_ts(start), end_time=_ts(end), metric=metric, limit=limit,
                    page_token=token), timeout=60)
                got += [(m.media_id, m.rank, m.view_time_seconds, m.starts, m.unique_viewers)
                        for m in reply.media]
                token = reply.next_page_token
                assert len(reply.media) == limit or not token
                if not token:
                    break
            assert got == want, (start, end, metric)
        default_page = stub.ListTopMedia(pb.ListTopMediaRequest(
            start_time=_ts(start), end_time=_ts(end)), timeout=60)
        assert [m.media_id for m in default_page.media] == [
            row[0] for row in expected.top(first, last, pb.TOP_MEDIA_METRIC_VIEW_TIME)[:10]]


def _violations(call: object, request: object) -> set[tuple[str, str]]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {(v.field, v.reason) for v in field_violations_of(caught.value)}


def check_errors(stub: pb_grpc.StatsServiceStub, unknown_media: int) -> None:
    for call, request in ((stub.GetMediaStats, pb.GetMediaStatsRequest(media_id=unknown_media)),
                          (stub.GetMediaTrend, pb.GetMediaTrendRequest(
                              media_id=unknown_media, start_time=_ts(0), end_time=_ts(60),
                              granularity=pb.GRANULARITY_MINUTE))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _violations(stub.GetMediaStats, pb.GetMediaStatsRequest(media_id=-2)) == {
        ("media_id", "NOT_POSITIVE")}
    assert _violations(stub.GetMediaTrend, pb.GetMediaTrendRequest(
        media_id=1, start_time=_ts(100), end_time=_ts(50))) == {
        ("granularity", "REQUIRED"), ("end_time", "INVALID_RANGE")}
    assert _violations(stub.GetMediaTrend, pb.GetMediaTrendRequest(
        media_id=1, start_time=_ts(0), end_time=_ts(86400 * 8),
        granularity=pb.GRANULARITY_MINUTE)) == {("end_time", "TOO_MANY_BUCKETS")}
    assert _violations(stub.ListTopMedia, pb.ListTopMediaRequest(
        start_time=_ts(0), end_time=_ts(60), limit=5000)) == {("limit", "OUT_OF_RANGE")}
    assert _violations(stub.ListTopMedia, pb.ListTopMediaRequest(
        start_time=_ts(0), end_time=_ts(60), page_token="garbage")) == {
        ("page_token", "INVALID_PAGE_TOKEN")}
    first = stub.ListTopMedia(pb.ListTopMediaRequest(start_time=_ts(0), end_time=_ts(2 * 10**9),
                                                     limit=1), timeout=30)
    assert first.next_page_token
    assert _violations(stub.ListTopMedia, pb.ListTopMediaRequest(
        start_time=_ts(0), end_time=_ts(2 * 10**9), metric=pb.TOP_MEDIA_METRIC_STARTS,
        page_token=first.next_page_token)) == {("page_token", "PAGE_TOKEN_MISMATCH")}
