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
import numpy as np
import pytest

from recommender_service.similarity import Metric
from tests.support import ServiceProcess, free_port, test_config, unique_name, wait_for
from tests.support.broker import end_offsets
from tests.support.data import accepted_events, generated_events
from tests.support.oracles import BruteForce, assert_same_ranking
from tests.support.positions import NOT_YET, covers
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import recommender_service_pb2_grpc as pb_grpc
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

SEED, USERS, MEDIA, GROUPS, EVENTS = 11, 1_200, 150, 8, 40_000
METRICS = {Metric.COSINE: pb.SIMILARITY_METRIC_COSINE, Metric.PEARSON: pb.SIMILARITY_METRIC_PEARSON}


class Deployment:
    """An ingest service and recommender instances, each with its own state directory."""

    def __init__(self, tmp_path: Path, bootstrap: str, partitions: int) -> None:
        self.tmp_path = tmp_path
        self.config = test_config(
            bootstrap,
            ingest_address=f"127.0.0.1:{free_port()}",
            recommender_group=unique_name("rec-scale"),
            topic_partitions=partitions,
            recommender_min_co_viewers=1,
            recommender_history_cap=100_000,
        )
        self.ingest = ServiceProcess(
            "ingest_service", self.config, self.config.ingest_address, tmp_path / "ingest.log"
        ).start()
        self.instances: list[ServiceProcess] = []

    def add(self, name: str, group: str | None = None) -> ServiceProcess:
        config = self.config.replace(
            recommender_address=f"127.0.0.1:{free_port()}",
            recommender_state_dir=str(self.tmp_path / name),
            recommender_group=group or self.config.recommender_group,
        )
        process = ServiceProcess(
            "recommender_service", config, config.recommender_address, self.tmp_path / f"{name}.log"
        ).start()
        self.instances.append(process)
        return process

    def upload(self, count: int, seed: int) -> BruteForce:
        events = generated_events(
            self.tmp_path / "events.jsonl",
            count,
            seed,
            users=USERS,
            media=MEDIA,
            groups=GROUPS,
            noise=0.02,
        )
        with grpc.insecure_channel(self.config.ingest_address, options=CHANNEL_OPTIONS) as channel:
            summary = upload(channel, iter(events), batch_size=5_000, timeout=300)
        kept = accepted_events(events)
        assert summary.accepted == len(kept)
        assert len({e.event_id for e in kept}) < len(kept)  # duplicates really were sent
        return BruteForce(kept)

    def stop(self) -> None:
        for process in self.instances:
            process.stop()
        self.ingest.stop()


def similar(address: str, item: int, metric: int, limit: int = 25) -> pb.GetSimilarMediaResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RecommenderServiceStub(channel).GetSimilarMedia(
            pb.GetSimilarMediaRequest(media_id=item, limit=limit, metric=metric), timeout=30
        )


def recommend(address: str, user: int) -> pb.RecommendForUserResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.RecommenderServiceStub(channel).RecommendForUser(
            pb.RecommendForUserRequest(user_id=user, limit=10), timeout=30
        )


def complete(address: str, item: int, targets: dict[int, int]) -> bool:
    """A complete answer whose position lists every partition at its target offset."""
    try:
        position = similar(address, item, pb.SIMILARITY_METRIC_COSINE).position
    except grpc.RpcError as error:
        if error.code() in NOT_YET:
            return False
        raise
    return sorted(p.partition for p in position.partitions) == sorted(targets) and covers(
        position, targets
    )


def sample_items(truth: BruteForce, count: int) -> list[int]:
    viewers = (truth.w > 0).sum(axis=0)
    by_popularity = [truth.items[b] for b in np.argsort(-viewers, kind="stable")]
    rng = np.random.default_rng(5)
    return by_popularity[:5] + sorted(
        rng.choice(by_popularity[5:], count - 5, replace=False).tolist()
    )


def answer_of(reply: pb.GetSimilarMediaResponse) -> list[tuple[int, float, int]]:
    return [(s.media_id, s.score, s.co_viewers) for s in reply.similar_media]


def check_against_brute_force(
    reply: pb.GetSimilarMediaResponse, truth: BruteForce, item: int, metric: Metric
) -> None:
    assert_same_ranking(
        [s.media_id for s in reply.similar_media],
        [s.score for s in reply.similar_media],
        [s.co_viewers for s in reply.similar_media],
        truth.scores(item, metric),
        25,
    )


@pytest.fixture(scope="module")
def eight_partitions(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Deployment, list[ServiceProcess], ServiceProcess, BruteForce]]:
    made = Deployment(tmp_path_factory.mktemp("rec-scale-8"), kafka_bootstrap, 8)
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
            wait_for(
                lambda p=process: complete(p.address, probe, targets),
                180,
                message=lambda p=process: f"{p.address} not complete:\n{p.tail()}",
            )
        yield made, members, single, truth
    finally:
        made.stop()


def test_every_instance_answers_similar_media_exactly(
    eight_partitions: tuple[Deployment, list[ServiceProcess], ServiceProcess, BruteForce],
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
    eight_partitions: tuple[Deployment, list[ServiceProcess], ServiceProcess, BruteForce],
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
    made = Deployment(tmp_path, kafka_bootstrap, 2)
    try:
        for name in ("a", "b", "c"):
            made.add(name)
        made.ingest.wait_serving()  # an instance with no partition never reports SERVING
        truth = made.upload(10_000, SEED + 1)
        targets = end_offsets(kafka_bootstrap, made.config.view_topic)
        probe = sample_items(truth, 6)[0]
        for process in made.instances:
            wait_for(
                lambda p=process: complete(p.address, probe, targets),
                180,
                message=lambda p=process: f"{p.address} not complete:\n{p.tail()}",
            )
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
