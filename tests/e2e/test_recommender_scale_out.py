"""Several recommender instances in one consumer group: any instance answers completely and
exactly.

Two instances split an 8-partition topic, and a third runs alone in a group of its own. After a
noisy generated upload, GetSimilarMedia (both metrics) from each of the two equals the single
instance's answer exactly (ids, scores, co-viewers) and brute force over the accepted events to
1e-9; RecommendForUser from each equals the single instance's answer. With more instances than
partitions (3 on 2) the instance that owns none answers exactly too, by asking the owners.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support import ServiceProcess, unique_name, wait_for
from tests.support.broker import end_offsets
from tests.support.oracles import BruteForce
from tests.support.recommender_group import (
    METRICS,
    RecommenderGroup,
    answer_of,
    check_against_brute_force,
    complete,
    recommend,
    sample_items,
    similar,
)
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import recommender_service_pb2_grpc as pb_grpc

SEED, EVENTS = 11, 40_000


@pytest.fixture(scope="module")
def eight_partitions(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RecommenderGroup, list[ServiceProcess], ServiceProcess, BruteForce]]:
    made = RecommenderGroup(tmp_path_factory.mktemp("rec-scale-8"), kafka_bootstrap, 8)
    try:
        members = [made.add("a"), made.add("b")]
        single = made.add("single", group=unique_name("rec-single"))
        for process in [made.ingest, *made.instances]:
            process.wait_serving()
        truth = made.upload(EVENTS, SEED)
        targets = end_offsets(kafka_bootstrap, made.config.view_topic)
        assert len(targets) == 8
        probe = sample_items(truth, 6)[0]
        for process in made.instances:

            def done(p: ServiceProcess = process) -> bool:
                return complete(p.address, probe, targets)

            def not_done(p: ServiceProcess = process) -> str:
                return f"{p.address} not complete:\n{p.tail()}"

            wait_for(done, 180, message=not_done)
        yield made, members, single, truth
    finally:
        made.stop()


def test_every_instance_answers_similar_media_exactly(
    eight_partitions: tuple[RecommenderGroup, list[ServiceProcess], ServiceProcess, BruteForce],
) -> None:
    _, members, single, truth = eight_partitions
    for item in sample_items(truth, 25):
        for metric, wire in METRICS.items():
            expected = similar(single.address, item, wire)
            check_against_brute_force(expected, truth, item, metric)
            for member in members:
                reply = similar(member.address, item, wire)
                assert answer_of(reply) == answer_of(expected), (member.address, item, metric)
                assert [p.partition for p in reply.position.partitions] == list(range(8))
                assert reply.position.caught_up


def test_every_instance_recommends_as_the_single_instance(
    eight_partitions: tuple[RecommenderGroup, list[ServiceProcess], ServiceProcess, BruteForce],
) -> None:
    _, members, single, truth = eight_partitions
    users = [int(u) for u in truth.users[:25]] + [10**12]  # the last one: unknown, fallback
    for user in users:
        expected = recommend(single.address, user)
        assert expected.recommendations
        for member in members:
            reply = recommend(member.address, user)
            assert [(r.media_id, r.score) for r in reply.recommendations] == [
                (r.media_id, r.score) for r in expected.recommendations
            ], (member.address, user)
            assert reply.fallback == expected.fallback
            assert [p.partition for p in reply.position.partitions] == list(range(8))
    # One figure for the report: GetSimilarMedia through a member (fan-out) and the single one.
    item = sample_items(truth, 6)[0]
    for label, address in (("fan-out", members[0].address), ("single", single.address)):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            request = pb.GetSimilarMediaRequest(media_id=item, limit=25)
            stub.GetSimilarMedia(request, timeout=30)
            started = time.perf_counter()
            for _ in range(20):
                stub.GetSimilarMedia(request, timeout=30)
            print(f"GetSimilarMedia {label}: {1000 * (time.perf_counter() - started) / 20:.2f} ms")


def test_an_instance_with_no_partition_answers_exactly(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    made = RecommenderGroup(tmp_path, kafka_bootstrap, 2)
    try:
        for name in ("a", "b", "c"):
            made.add(name)
        made.ingest.wait_serving()  # an instance with no partition never reports SERVING
        truth = made.upload(10_000, SEED + 1)
        targets = end_offsets(kafka_bootstrap, made.config.view_topic)
        probe = sample_items(truth, 6)[0]
        for process in made.instances:

            def done(p: ServiceProcess = process) -> bool:
                return complete(p.address, probe, targets)

            def not_done(p: ServiceProcess = process) -> str:
                return f"{p.address} not complete:\n{p.tail()}"

            wait_for(done, 180, message=not_done)
        idle = [p for p in made.instances if "assigned partitions []" in p.log_path.read_text()]
        assert idle, "no instance was left without a partition"
        for item in sample_items(truth, 10):
            for metric, wire in METRICS.items():
                replies = [similar(p.address, item, wire) for p in made.instances]
                check_against_brute_force(replies[0], truth, item, metric)
                assert all(answer_of(r) == answer_of(replies[0]) for r in replies)
        for user in [int(u) for u in truth.users[:10]] + [10**12]:
            replies = [recommend(p.address, user) for p in made.instances]
            assert replies[0].recommendations
            assert all(
                [(r.media_id, r.score) for r in reply.recommendations]
                == [(r.media_id, r.score) for r in replies[0].recommendations]
                and reply.fallback == replies[0].fallback
                for reply in replies
            )
        # The unknown user's fallback is the most watched items over every partition.
        viewers, total = (truth.w > 0).sum(axis=0), truth.w.sum(axis=0)
        order = sorted(
            range(len(truth.items)), key=lambda b: (-viewers[b], -total[b], truth.items[b])
        )
        assert replies[-1].fallback
        assert [r.media_id for r in replies[-1].recommendations] == [
            truth.items[b] for b in order[:10]
        ]
    finally:
        made.stop()
