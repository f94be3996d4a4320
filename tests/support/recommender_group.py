"""Recommender instances in one consumer group behind one ingest service, and the queries the
scale-out tests ask them, checked against brute force (tests/support/oracles.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from recommender_service.similarity import Metric
from tests.support.configs import free_port, test_config, unique_name
from tests.support.data import accepted_events, generated_events
from tests.support.oracles import BruteForce, assert_same_ranking
from tests.support.positions import NOT_YET, covers
from tests.support.processes import ServiceProcess
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import recommender_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

# The generated files of the recommender scale-out tests: grouped tastes, so rows are long.
USERS, MEDIA, GROUPS = 1_200, 150, 8
METRICS = {Metric.COSINE: pb.SIMILARITY_METRIC_COSINE, Metric.PEARSON: pb.SIMILARITY_METRIC_PEARSON}


class RecommenderGroup:
    """An ingest service and recommender instances, each with its own state directory; an
    instance in another group (`add(name, group=...)`) serves as a single-instance reference."""

    def __init__(
        self, tmp_path: Path, bootstrap: str, partitions: int, **overrides: object
    ) -> None:
        self.tmp_path = tmp_path
        values: dict[str, object] = dict(
            ingest_address=f"127.0.0.1:{free_port()}",
            recommender_group=unique_name("rec-scale"),
            topic_partitions=partitions,
            recommender_min_co_viewers=1,
            recommender_history_cap=100_000,
        )
        values.update(overrides)
        self.config = test_config(bootstrap, **values)
        self.ingest = ServiceProcess(
            "ingest_service", self.config, self.config.ingest_address, tmp_path / "ingest.log"
        ).start()
        self.instances: list[ServiceProcess] = []

    def add(
        self, name: str, group: str | None = None, address: str | None = None
    ) -> ServiceProcess:
        """Start an instance (state under tmp_path/name; `address` to replace one in place)."""
        config = self.config.replace(
            recommender_address=address or f"127.0.0.1:{free_port()}",
            recommender_state_dir=str(self.tmp_path / name),
            recommender_group=group or self.config.recommender_group,
        )
        process = ServiceProcess(
            "recommender_service", config, config.recommender_address, self.tmp_path / f"{name}.log"
        ).start()
        self.instances.append(process)
        return process

    def events(self, count: int, seed: int) -> list[ve.ViewEvent]:
        """A noisy generated file's events, as the CLI would send them."""
        return generated_events(
            self.tmp_path / f"events-{seed}.jsonl",
            count,
            seed,
            users=USERS,
            media=MEDIA,
            groups=GROUPS,
            noise=0.02,
        )

    def upload(self, count: int, seed: int) -> BruteForce:
        events = self.events(count, seed)
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


def similar(
    address: str, item: int, metric: pb.SimilarityMetric, limit: int = 25
) -> pb.GetSimilarMediaResponse:
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
    """The five most watched items and a seeded random choice of the others."""
    viewers = (truth.w > 0).sum(axis=0)
    by_popularity = [truth.items[b] for b in np.argsort(-viewers, kind="stable")]
    rng = np.random.default_rng(5)
    return by_popularity[:5] + sorted(
        rng.choice(by_popularity[5:], count - 5, replace=False).tolist()
    )


def answer_of(reply: pb.GetSimilarMediaResponse) -> list[tuple[int, float, int]]:
    return [(s.media_id, s.score, s.co_viewers) for s in reply.similar_media]


def recommendations_of(reply: pb.RecommendForUserResponse) -> tuple[list[tuple[int, float]], bool]:
    return [(r.media_id, r.score) for r in reply.recommendations], reply.fallback


def check_against_brute_force(
    reply: pb.GetSimilarMediaResponse, truth: BruteForce, item: int, metric: Metric, limit: int = 25
) -> None:
    assert_same_ranking(
        [s.media_id for s in reply.similar_media],
        [s.score for s in reply.similar_media],
        [s.co_viewers for s in reply.similar_media],
        truth.scores(item, metric),
        limit,
    )
