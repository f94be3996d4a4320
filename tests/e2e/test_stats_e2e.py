"""Stats service end to end: generated noisy file -> ingest service -> Kafka -> stats service.

Every media item's totals, a sample of trends at each granularity and complete top-N rankings
(each metric, every page) are compared with a brute-force count over the same file, computed
here from the parsed lines with the ingest service's validation and first-copy-wins
de-duplication (tests/support: data and oracles, shared with the crash test).
"""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tests.support.broker import end_offsets
from tests.support.data import STATS_FILE, accepted_events, first_copies, generated_events
from tests.support.oracles import Expected, check_all_totals
from tests.support.positions import stats_position, wait_applied
from tests.support.processes import ingest_and_stats
from viewevents.rpc.errors import field_violations_of
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

SIZES = {pb.GRANULARITY_MINUTE: 60, pb.GRANULARITY_HOUR: 3600, pb.GRANULARITY_DAY: 86400}


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def test_stats_match_brute_force(kafka_bootstrap: str, tmp_path: Path) -> None:
    events = generated_events(tmp_path / "views.jsonl", 150_000, seed=21, **STATS_FILE)
    config, ingest, stats = ingest_and_stats(tmp_path, kafka_bootstrap)
    ingest.start()
    stats.start()
    try:
        ingest.wait_serving()
        stats.wait_serving()
        with grpc.insecure_channel(config.ingest_address, options=CHANNEL_OPTIONS) as channel:
            summary = upload(channel, events, batch_size=5_000, timeout=300)
        good = first_copies(accepted_events(events, config))
        assert summary.received == len(events) and summary.rejected > 0
        assert len(good) < summary.accepted  # duplicates were sent and must be dropped
        expected = Expected(good)
        targets = end_offsets(kafka_bootstrap, config.view_topic)
        assert sum(targets.values()) == summary.accepted
        position = wait_applied(config.stats_address, stats_position, targets)
        with grpc.insecure_channel(config.stats_address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.StatsServiceStub(channel)
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
            reply = stub.GetMediaTrend(
                pb.GetMediaTrendRequest(
                    media_id=media,
                    start_time=_ts(start),
                    end_time=_ts(end),
                    granularity=granularity,
                ),
                timeout=30,
            )
            first, last = start - start % size, -(-end // size) * size  # rounded outwards
            buckets, viewers = expected.trend(media, size, first, last)
            got = [
                (
                    b.start_time.seconds,
                    b.view_time_seconds,
                    b.starts,
                    b.stops,
                    b.ends,
                    b.unique_viewers,
                )
                for b in reply.buckets
            ]
            assert got == buckets, (media, size, start, end)
            assert reply.unique_viewers == viewers
            assert reply.granularity == granularity and reply.position.caught_up
        full = stub.GetMediaTrend(
            pb.GetMediaTrendRequest(
                media_id=popular[0],
                start_time=_ts(low),
                end_time=_ts(low + 30 * size),
                granularity=granularity,
                include_empty_buckets=True,
            ),
            timeout=30,
        )
        end = low + 30 * size  # not aligned: rounded up, so 31 buckets
        assert [b.start_time.seconds for b in full.buckets] == list(
            range(low - low % size, -(-end // size) * size, size)
        )
        assert sum(b.starts for b in full.buckets) == sum(
            row[2]
            for row in expected.trend(popular[0], size, low - low % size, -(-end // size) * size)[0]
        )


def check_top(stub: pb_grpc.StatsServiceStub, expected: Expected) -> None:
    low = min(r[3] for r in expected.rows)
    high = max(r[3] for r in expected.rows)
    day = 86400
    middle = low - low % day + day
    ranges = [
        (low, high + 1),
        (middle, middle + day),
        (middle + 3723, middle + day + 7 * 3600 + 42),
        (middle + 600, middle + 660),
    ]
    for start, end in ranges:
        first, last = start - start % 60, -(-end // 60) * 60
        for metric in (
            pb.TOP_MEDIA_METRIC_VIEW_TIME,
            pb.TOP_MEDIA_METRIC_STARTS,
            pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS,
        ):
            want = expected.top(first, last, metric)
            got: list[tuple] = []
            token = ""
            limit = 150
            while True:
                reply = stub.ListTopMedia(
                    pb.ListTopMediaRequest(
                        start_time=_ts(start),
                        end_time=_ts(end),
                        metric=metric,
                        limit=limit,
                        page_token=token,
                    ),
                    timeout=60,
                )
                got += [
                    (m.media_id, m.rank, m.view_time_seconds, m.starts, m.unique_viewers)
                    for m in reply.media
                ]
                token = reply.next_page_token
                assert len(reply.media) == limit or not token
                if not token:
                    break
            assert got == want, (start, end, metric)
        default_page = stub.ListTopMedia(
            pb.ListTopMediaRequest(start_time=_ts(start), end_time=_ts(end)), timeout=60
        )
        assert [m.media_id for m in default_page.media] == [
            row[0] for row in expected.top(first, last, pb.TOP_MEDIA_METRIC_VIEW_TIME)[:10]
        ]


def _violations(call: object, request: object) -> set[tuple[str, str]]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {(v.field, v.reason) for v in field_violations_of(caught.value)}


def check_errors(stub: pb_grpc.StatsServiceStub, unknown_media: int) -> None:
    for call, request in (
        (stub.GetMediaStats, pb.GetMediaStatsRequest(media_id=unknown_media)),
        (
            stub.GetMediaTrend,
            pb.GetMediaTrendRequest(
                media_id=unknown_media,
                start_time=_ts(0),
                end_time=_ts(60),
                granularity=pb.GRANULARITY_MINUTE,
            ),
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _violations(stub.GetMediaStats, pb.GetMediaStatsRequest(media_id=-2)) == {
        ("media_id", "NOT_POSITIVE")
    }
    assert _violations(
        stub.GetMediaTrend,
        pb.GetMediaTrendRequest(media_id=1, start_time=_ts(100), end_time=_ts(50)),
    ) == {("granularity", "REQUIRED"), ("end_time", "INVALID_RANGE")}
    assert _violations(
        stub.GetMediaTrend,
        pb.GetMediaTrendRequest(
            media_id=1,
            start_time=_ts(0),
            end_time=_ts(86400 * 8),
            granularity=pb.GRANULARITY_MINUTE,
        ),
    ) == {("end_time", "TOO_MANY_BUCKETS")}
    assert _violations(
        stub.ListTopMedia, pb.ListTopMediaRequest(start_time=_ts(0), end_time=_ts(60), limit=5000)
    ) == {("limit", "OUT_OF_RANGE")}
    assert _violations(
        stub.ListTopMedia,
        pb.ListTopMediaRequest(start_time=_ts(0), end_time=_ts(60), page_token="garbage"),
    ) == {("page_token", "INVALID_PAGE_TOKEN")}
    first = stub.ListTopMedia(
        pb.ListTopMediaRequest(start_time=_ts(0), end_time=_ts(2 * 10**9), limit=1), timeout=30
    )
    assert first.next_page_token
    assert _violations(
        stub.ListTopMedia,
        pb.ListTopMediaRequest(
            start_time=_ts(0),
            end_time=_ts(2 * 10**9),
            metric=pb.TOP_MEDIA_METRIC_STARTS,
            page_token=first.next_page_token,
        ),
    ) == {("page_token", "PAGE_TOKEN_MISMATCH")}
