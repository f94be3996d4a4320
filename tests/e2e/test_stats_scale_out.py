"""Several stats instances in one consumer group: any instance answers completely and exactly.

Three instances split an 8-partition topic; each answers every GetMediaStats and GetMediaTrend
for every media item exactly as brute force over the uploaded file, and as a single instance in
a group of its own. One instance is killed with kill -9 while a second upload flows: every
answer of the others is then complete and sound (at least what its position promises, never
more than everything uploaded) or UNAVAILABLE with google.rpc.RetryInfo, and after the
rebalance every answer is exact again. An instance that owns no partition (more instances than
partitions) answers exactly by asking the owners.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tests.support import ServiceProcess, unique_name, wait_for
from tests.support.broker import end_offsets, read_events
from tests.support.data import STATS_FILE, accepted_events, first_copies, generated_events
from tests.support.oracles import Expected, StatsBounds, check_all_totals
from tests.support.pollers import Poller
from tests.support.stats_group import StatsGroup, stats_of
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc

PARTITIONS = 8
ANSWERED_BY = "x-viewevents-answered-by"


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def stats_answer(address: str, media: int) -> pb.GetMediaStatsResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.StatsServiceStub(channel).GetMediaStats(
            pb.GetMediaStatsRequest(media_id=media), timeout=10
        )


def applied_all(address: str, media: int, targets: dict[int, int]) -> bool:
    """A complete answer whose position reached `targets` on every partition."""
    try:
        position = stats_answer(address, media).position
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
            return False
        raise
    offsets = {p.partition: p.offset for p in position.partitions}
    return set(offsets) == set(targets) and all(offsets[p] >= o for p, o in targets.items())


def trends(
    address: str,
    media_ids: list[int],
    start: int,
    end: int,
    granularity: pb.Granularity = pb.GRANULARITY_DAY,
) -> dict[int, tuple]:
    """Buckets over the span and the span's unique viewers, per media item; every answer must
    cover all partitions."""
    out = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StatsServiceStub(channel)
        for media in media_ids:
            reply = stub.GetMediaTrend(
                pb.GetMediaTrendRequest(
                    media_id=media,
                    start_time=_ts(start),
                    end_time=_ts(end),
                    granularity=granularity,
                ),
                timeout=30,
            )
            assert len(reply.position.partitions) == PARTITIONS
            out[media] = (
                [
                    (
                        b.start_time.seconds,
                        b.view_time_seconds,
                        b.starts,
                        b.stops,
                        b.ends,
                        b.unique_viewers,
                    )
                    for b in reply.buckets
                ],
                reply.unique_viewers,
            )
    return out


@pytest.fixture
def group(tmp_path: Path, kafka_bootstrap: str) -> Iterator[StatsGroup]:
    made = StatsGroup(tmp_path, kafka_bootstrap, PARTITIONS)
    yield made
    made.stop()


def test_every_instance_answers_exactly_and_a_kill_is_never_partial(
    group: StatsGroup, kafka_bootstrap: str, tmp_path: Path
) -> None:
    events = generated_events(tmp_path / "views.jsonl", 40_000, seed=77, **STATS_FILE)
    first, second = events[:24_000], events[24_000:]
    group.ingest.start()
    a, b, c = group.add("a"), group.add("b"), group.add("c")
    single = group.add("single", group=unique_name("single"))
    group.ingest.wait_serving()
    group.send(first)
    good = first_copies(accepted_events(first, group.config))
    expected = Expected(good)
    targets = end_offsets(kafka_bootstrap, group.config.view_topic)
    assert len(targets) == PARTITIONS
    probe = max(expected.by_media, key=lambda m: len(expected.by_media[m]))
    for process in (a, b, c, single):

        def done(p: ServiceProcess = process) -> bool:
            return applied_all(p.address, probe, targets)

        def not_done(p: ServiceProcess = process) -> str:
            return f"{p.address} not complete: {p.tail()}"

        wait_for(done, 180, message=not_done)

    # Each group member owns part of the topic, and answers for all of it.
    media_ids = sorted(expected.by_media)
    low = min(r[3] for r in expected.rows) - 86_400
    high = max(r[3] for r in expected.rows) + 86_400
    reference = trends(single.address, media_ids, low, high)
    for process in (a, b, c):
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.StatsServiceStub(channel)
            check_all_totals(stub, expected)
            reply, call = stub.GetMediaStats.with_call(pb.GetMediaStatsRequest(media_id=probe))
            assert dict(call.trailing_metadata()).get(ANSWERED_BY) == process.address
            assert [p.partition for p in reply.position.partitions] == list(range(PARTITIONS))
        got = trends(process.address, media_ids, low, high)
        assert got == reference
        for media in media_ids:
            buckets, viewers = expected.trend(
                media, 86_400, low - low % 86_400, -(-high // 86_400) * 86_400
            )
            assert got[media] == (buckets, viewers), media
        sample = media_ids[:: max(1, len(media_ids) // 15)]
        hourly = pb.GRANULARITY_HOUR
        assert trends(process.address, sample, low, high, hourly) == trends(
            single.address, sample, low, high, hourly
        )
        for media in media_ids:
            assert (
                stats_answer(process.address, media).stats
                == stats_answer(single.address, media).stats
            )

    # kill -9 one member while a second upload flows.
    watched = sorted(expected.by_media, key=lambda m: -len(expected.by_media[m]))[:4]
    pollers = [Poller(a.address, watched, stats_of), Poller(c.address, watched, stats_of)]
    for poller in pollers:
        poller.start()
    sender = threading.Thread(target=group.send, args=(second,), daemon=True)
    sender.start()
    wait_for(
        lambda: (
            sum(end_offsets(kafka_bootstrap, group.config.view_topic).values())
            > sum(targets.values()) + 2_000
        ),
        120,
        message="second upload under way",
    )
    b.kill()
    sender.join(300)
    assert not sender.is_alive()
    everything = first_copies(accepted_events(events, group.config))
    final = end_offsets(kafka_bootstrap, group.config.view_topic)
    for process in (a, c, single):

        def done(p: ServiceProcess = process) -> bool:
            return applied_all(p.address, probe, final)

        def not_done(p: ServiceProcess = process) -> str:
            return f"{p.address} not complete after the kill: {p.tail()}"

        wait_for(done, 180, message=not_done)
    for poller in pollers:
        poller.stop()

    bounds = StatsBounds(read_events(kafka_bootstrap, group.config.view_topic))
    answers = [(x.key, x.offsets, x.value) for poller in pollers for x in poller.answers]
    unavailable = [x for poller in pollers for x in poller.unavailable]
    assert not [e for poller in pollers for e in poller.other_errors]
    partial = [(m, offsets) for m, offsets, _ in answers if set(offsets) != set(range(PARTITIONS))]
    assert not partial, f"answers not covering every partition: {partial[:3]}"
    unsound = [
        (m, offsets, got, bounds.totals(m, offsets), bounds.totals(m, None))
        for m, offsets, got in answers
        if not all(
            lo <= g <= hi
            for g, lo, hi in zip(got, bounds.totals(m, offsets), bounds.totals(m, None))
        )
    ]
    assert not unsound, f"{len(unsound)} answers outside their position's bounds: {unsound[:3]}"
    assert unavailable, "the kill left no gap: no UNAVAILABLE answer was seen"
    assert all(delay is not None and delay > 0 for _, delay in unavailable), unavailable[:3]
    assert answers

    # After the rebalance and catch-up: exact again, on every survivor.
    expected = Expected(everything)
    for process in (a, c):
        with grpc.insecure_channel(process.address) as channel:
            check_all_totals(pb_grpc.StatsServiceStub(channel), expected)
        assert trends(process.address, watched, low, high) == trends(
            single.address, watched, low, high
        )


def test_an_instance_that_owns_no_partition_answers_by_asking_the_owners(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    group = StatsGroup(tmp_path, kafka_bootstrap, 2)
    try:
        group.ingest.start()
        members = [group.add(name) for name in ("x", "y", "z")]
        group.ingest.wait_serving()
        events = generated_events(tmp_path / "small.jsonl", 6_000, seed=5, **STATS_FILE)
        group.send(events)
        expected = Expected(first_copies(accepted_events(events, group.config)))
        targets = end_offsets(kafka_bootstrap, group.config.view_topic)
        probe = max(expected.by_media, key=lambda m: len(expected.by_media[m]))
        for process in members:

            def done(p: ServiceProcess = process) -> bool:
                return applied_all(p.address, probe, targets)

            def not_done(p: ServiceProcess = process) -> str:
                return f"{p.address} not complete: {p.tail()}"

            wait_for(done, 180, message=not_done)
        idle = [p for p in members if "assigned partitions []" in p.log_path.read_text()]
        assert idle, "no instance was left without a partition"
        for process in members:
            with grpc.insecure_channel(process.address) as channel:
                check_all_totals(pb_grpc.StatsServiceStub(channel), expected)
    finally:
        group.stop()
