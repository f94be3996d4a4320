"""Groups that change while events flow: never a partial answer, exact once caught up.

Stats and recommender groups on an 8-partition topic grow from one instance to three while a
noisy generated file is uploaded in parts (each start placed by the progress of the first
instance's complete answers, with parts still to come). A recommender member is killed with
kill -9 mid-upload and replaced later. All the while, queries go to every running instance:
each answer lists every partition and is sound for its position (stats: between brute force
below the position's offsets and brute force over everything; recommender: co-viewer counts
likewise), no partition's offset goes back, or the answer is UNAVAILABLE with RetryInfo. At the
end every instance answers exactly as brute force over the file (and, for recommendations, as a
single instance in a group of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from tests.support import ServiceProcess, unique_name, wait_for
from tests.support.broker import end_offsets, read_events
from tests.support.data import STATS_FILE, accepted_events, first_copies, generated_events
from tests.support.oracles import (
    BruteForce,
    CoViewerBounds,
    Expected,
    StatsBounds,
    check_all_totals,
    close,
)
from tests.support.pollers import (
    Ask,
    Poller,
    check_never_partial,
    stop_once_answered,
    summary,
)
from tests.support.positions import (
    applied_records,
    recommender_position,
    stats_position,
    wait_applied,
)
from tests.support.recommender_group import (
    METRICS,
    RecommenderGroup,
    answer_of,
    check_against_brute_force,
    recommend,
    recommendations_of,
    sample_items,
    similar,
)
from tests.support.stats_group import StatsGroup, stats_of
from tests.support.uploads import PartedUpload
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents.v1 import view_event_pb2 as ve

PARTITIONS = 8
PARTS = 3  # the 2nd and the 3rd instance start during parts 1 and 2
EVENTS = 18_000
NOT_FOUND = [grpc.StatusCode.NOT_FOUND]  # an item none of whose events is applied yet

Read = Callable[[grpc.Channel], ve.ConsumerPosition]


def neighbours_of(channel: grpc.Channel, item: int) -> tuple[ve.ConsumerPosition, list[tuple]]:
    """GetSimilarMedia (cosine, 25) for a Poller: (position, [(media, score, co-viewers)])."""
    reply = rec_grpc.RecommenderServiceStub(channel).GetSimilarMedia(
        rec_pb.GetSimilarMediaRequest(
            media_id=item, limit=25, metric=rec_pb.SIMILARITY_METRIC_COSINE
        ),
        timeout=20,
    )
    return reply.position, answer_of(reply)


def progressed(address: str, read: Read, floor: int) -> int:
    """Records the instance's complete answers show applied, once beyond `floor` (0 while not)."""
    applied = applied_records(address, read)
    return applied if applied is not None and applied > floor else 0


def grow_to_three(
    add: Callable[[str], ServiceProcess],
    first: ServiceProcess,
    uploader: PartedUpload,
    read: Read,
    keys: list[int],
    ask: Ask,
    part: int,
) -> tuple[list[ServiceProcess], list[Poller]]:
    """Start "b", then "c", each once `first` has applied a quarter part more than at the last
    start, and release the next part after each start; pollers on all three from the start."""
    instances = [first]
    pollers = [Poller.when_listening(first.address, keys, ask, NOT_FOUND)]
    floor = 0
    for name in ("b", "c"):

        def beyond(f: int = floor + part // 4) -> int:
            return progressed(first.address, read, f)

        floor = wait_for(
            beyond,
            180,
            message=f"{first.address} made no progress before starting {name}",
        )
        instance = add(name)
        instances.append(instance)
        pollers.append(Poller.when_listening(instance.address, keys, ask, NOT_FOUND))
        uploader.release()
    return instances, pollers


def test_stats_grow_from_one_to_three_while_events_flow(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    group = StatsGroup(tmp_path, kafka_bootstrap, PARTITIONS, prefix="grow")
    pollers: list[Poller] = []
    try:
        events = generated_events(tmp_path / "grow.jsonl", EVENTS, seed=91, **STATS_FILE)
        expected = Expected(first_copies(accepted_events(events, group.config)))
        watched = sorted(expected.by_media, key=lambda m: -len(expected.by_media[m]))[:4]
        group.ingest.start()
        first = group.add("a")
        group.ingest.wait_serving()
        first.wait_serving()
        uploader = PartedUpload(group.config.ingest_address, events, PARTS, 2_000).start()
        instances, pollers = grow_to_three(
            group.add, first, uploader, stats_position, watched, stats_of, len(events) // PARTS
        )
        settle(
            uploader, kafka_bootstrap, group.config.view_topic, instances, stats_position, pollers
        )

        check_never_partial(pollers, PARTITIONS)
        bounds = StatsBounds(read_events(kafka_bootstrap, group.config.view_topic))
        unsound = [
            (a.key, a.offsets, a.value)
            for poller in pollers
            for a in poller.answers
            if not all(
                lo <= got <= hi
                for got, lo, hi in zip(
                    a.value, bounds.totals(a.key, a.offsets), bounds.totals(a.key, None)
                )
            )
        ]
        assert not unsound, f"{len(unsound)} answers outside their position's bounds: {unsound[:3]}"
        for instance in instances:
            with grpc.insecure_channel(instance.address) as channel:
                check_all_totals(stats_grpc.StatsServiceStub(channel), expected)
    finally:
        for poller in pollers:
            poller.stop()
        group.stop()


def settle(
    uploader: PartedUpload,
    bootstrap: str,
    topic: str,
    instances: Sequence[ServiceProcess],
    position: Callable[[grpc.Channel], ve.ConsumerPosition],
    pollers: list[Poller],
) -> None:
    """End of the flow: the upload finished, every instance applied the whole topic, and each
    poller has answered once; then the pollers stop."""
    uploader.finish()
    final = end_offsets(bootstrap, topic)
    for instance in instances:
        wait_applied(instance.address, position, final, timeout=240)
    stop_once_answered(pollers)
    print(summary(pollers))


def check_co_viewers(pollers: list[Poller], bounds: CoViewerBounds) -> None:
    """Every listed neighbour's co-viewers lie between brute force at the answer's position and
    brute force over everything (each distinct answer checked once)."""
    unsound = []
    for poller in pollers:
        seen = set()
        for n, answer in enumerate(poller.answers):
            key = (answer.key, tuple(sorted(answer.offsets.items())), tuple(answer.value))
            if key in seen:
                continue
            seen.add(key)
            for j, _, c in answer.value:
                lo = bounds.co_viewers(answer.key, j, answer.offsets)
                hi = bounds.co_viewers(answer.key, j)
                if not lo <= c <= hi:
                    unsound.append((poller.address, n, answer.key, answer.offsets, j, c, lo, hi))
    assert not unsound, f"{len(unsound)} co-viewer counts outside their bounds: {unsound[:3]}"


def check_exact(
    instances: list[ServiceProcess], truth: BruteForce, reference: ServiceProcess | None = None
) -> None:
    """GetSimilarMedia (both metrics) through every instance equals brute force, and the
    instances (and `reference`, a single instance) answer identically."""
    for item in sample_items(truth, 12):
        for metric, wire in METRICS.items():
            replies = [similar(p.address, item, wire) for p in instances]
            check_against_brute_force(replies[0], truth, item, metric)
            assert all(answer_of(r) == answer_of(replies[0]) for r in replies), (item, metric)
            if reference is not None:
                assert answer_of(similar(reference.address, item, wire)) == answer_of(replies[0])
            assert all(len(r.position.partitions) == PARTITIONS for r in replies)


def test_recommender_grows_from_one_to_three_while_events_flow(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    group = RecommenderGroup(tmp_path, kafka_bootstrap, PARTITIONS)
    pollers: list[Poller] = []
    try:
        events = group.events(EVENTS, seed=93)
        truth = BruteForce(accepted_events(events))
        first = group.add("a")
        group.ingest.wait_serving()
        first.wait_serving()
        uploader = PartedUpload(group.config.ingest_address, events, PARTS, 2_000).start()
        instances, pollers = grow_to_three(
            group.add,
            first,
            uploader,
            recommender_position,
            sample_items(truth, 6)[:4],
            neighbours_of,
            len(events) // PARTS,
        )
        settle(
            uploader,
            kafka_bootstrap,
            group.config.view_topic,
            instances,
            recommender_position,
            pollers,
        )

        check_never_partial(pollers, PARTITIONS)
        check_co_viewers(
            pollers, CoViewerBounds(read_events(kafka_bootstrap, group.config.view_topic))
        )
        check_exact(instances, truth)
    finally:
        for poller in pollers:
            poller.stop()
        group.stop()


def test_recommender_member_killed_mid_upload_and_replaced(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    group = RecommenderGroup(tmp_path, kafka_bootstrap, PARTITIONS)
    pollers: list[Poller] = []
    try:
        events = group.events(EVENTS, seed=95)
        truth = BruteForce(accepted_events(events))
        survivor, victim = group.add("a"), group.add("b")
        single = group.add("single", group=unique_name("rec-single"))
        group.ingest.wait_serving()
        for process in (survivor, victim, single):
            process.wait_serving()
        keys = sample_items(truth, 6)[:4]
        pollers = [Poller.when_listening(survivor.address, keys, neighbours_of, NOT_FOUND)]
        part = len(events) // PARTS
        uploader = PartedUpload(group.config.ingest_address, events, PARTS, 2_000).start()
        killed_at = wait_for(
            lambda: progressed(victim.address, recommender_position, part // 4),
            180,
            message="the victim made no progress",
        )
        victim.kill()
        uploader.release()
        # The gap: the survivor cannot answer for the victim's partitions until the group hands
        # them over (session timeout) and it has replayed them; then it answers alone.
        wait_for(
            lambda: progressed(survivor.address, recommender_position, killed_at + part // 4),
            240,
            message=lambda: f"the survivor made no progress after the kill: {survivor.tail()}",
        )
        replacement = group.add("b2")
        pollers.append(Poller.when_listening(replacement.address, keys, neighbours_of, NOT_FOUND))
        uploader.release()
        uploader.finish()
        final = end_offsets(kafka_bootstrap, group.config.view_topic)
        for process in (survivor, replacement, single):
            wait_applied(process.address, recommender_position, final, timeout=240)
        stop_once_answered(pollers)
        print(summary(pollers))

        check_never_partial(pollers, PARTITIONS)
        assert pollers[0].unavailable, "the kill left no gap: no UNAVAILABLE answer was seen"
        check_co_viewers(
            pollers, CoViewerBounds(read_events(kafka_bootstrap, group.config.view_topic))
        )
        check_exact([survivor, replacement], truth, reference=single)
        for user in [int(u) for u in truth.users[:15]] + [10**12]:
            expected, fallback = recommendations_of(recommend(single.address, user))
            assert expected
            for process in (survivor, replacement):
                got, got_fallback = recommendations_of(recommend(process.address, user))
                assert got_fallback == fallback and [m for m, _ in got] == [m for m, _ in expected]
                assert all(close(a, b) for (_, a), (_, b) in zip(got, expected)), (
                    process.address,
                    user,
                )
    finally:
        for poller in pollers:
            poller.stop()
        group.stop()
