"""Ingest and recommender as real subprocesses over the real broker, checked against numpy.

Generated legacy data (viewevents_tools.generator: power-law popularity, planted co-viewing groups, noise
including duplicates and invalid lines) is parsed, uploaded through the ingest service, and once
the recommender's position covers every accepted record its answers must equal a brute-force
computation over the events the ingest service accepts (its validation rules, decided here by
ingest_service.validation, not by the recommender).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest

from recommender_service.similarity import Metric
from tests.support.configs import free_port, test_config, unique_name
from tests.support.data import accepted_events, generated_events
from tests.support.oracles import BruteForce, assert_same_ranking
from tests.support.positions import recommender_position, wait_applied
from tests.support.processes import ServiceProcess
from viewevents.rpc.errors import field_violations_of
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import recommender_service_pb2_grpc as pb_grpc
from viewevents_client.uploads import CHANNEL_OPTIONS, upload
from viewevents_tools import generator

SEED, USERS, MEDIA, GROUPS, EVENTS = 7, 2_000, 200, 10, 80_000
METRICS = {Metric.COSINE: pb.SIMILARITY_METRIC_COSINE, Metric.PEARSON: pb.SIMILARITY_METRIC_PEARSON}


@pytest.fixture(scope="module")
def deployment(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("recommender-e2e")
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        recommender_address=f"127.0.0.1:{free_port()}",
        recommender_state_dir=str(base / "state"),
        recommender_group=unique_name("rec"),
        recommender_min_co_viewers=1,
        recommender_history_cap=100_000,
    )
    ingest = ServiceProcess(
        "ingest_service", config, config.ingest_address, base / "ingest.log"
    ).start()
    recommender = ServiceProcess(
        "recommender_service", config, config.recommender_address, base / "recommender.log"
    ).start()
    try:
        ingest.wait_serving()
        recommender.wait_serving()
        path = base / "events.jsonl"
        events = generated_events(
            path, EVENTS, SEED, users=USERS, media=MEDIA, groups=GROUPS, noise=0.02
        )
        with grpc.insecure_channel(ingest.address, options=CHANNEL_OPTIONS) as channel:
            summary = upload(channel, events, batch_size=5_000, timeout=120)
        kept = accepted_events(events)
        assert summary.accepted == len(kept) and summary.rejected == len(events) - len(kept)
        assert len({e.event_id for e in kept}) < len(kept)  # duplicates really were sent
        wait_applied(recommender.address, recommender_position, summary.accepted)
        with grpc.insecure_channel(recommender.address) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            yield {"stub": stub, "truth": BruteForce(kept), "recommender": recommender}
    finally:
        recommender.stop()
        ingest.stop()


def sample_items(truth: BruteForce) -> list[int]:
    viewers = (truth.w > 0).sum(axis=0)
    by_popularity = [truth.items[b] for b in np.argsort(-viewers, kind="stable")]
    rng = np.random.default_rng(3)
    return by_popularity[:10] + sorted(rng.choice(by_popularity[10:], 20, replace=False).tolist())


def test_similar_media_equal_brute_force_for_both_metrics(deployment: dict) -> None:
    stub, truth = deployment["stub"], deployment["truth"]
    for item in sample_items(truth):
        for metric, wire in METRICS.items():
            reply = stub.GetSimilarMedia(
                pb.GetSimilarMediaRequest(media_id=item, limit=25, metric=wire)
            )
            assert reply.position.caught_up
            assert_same_ranking(
                [s.media_id for s in reply.similar_media],
                [s.score for s in reply.similar_media],
                [s.co_viewers for s in reply.similar_media],
                truth.scores(item, metric),
                25,
            )
    default = stub.GetSimilarMedia(pb.GetSimilarMediaRequest(media_id=sample_items(truth)[0]))
    assert len(default.similar_media) == 10  # limit 0 means 10, metric unset means cosine
    cosine = truth.scores(sample_items(truth)[0], Metric.COSINE)
    assert all(abs(s.score - cosine[s.media_id][0]) < 1e-9 for s in default.similar_media)


def test_top_ten_are_mostly_from_the_planted_group(deployment: dict) -> None:
    stub, truth = deployment["stub"], deployment["truth"]
    viewers = (truth.w > 0).sum(axis=0)
    popular = [truth.items[b] for b in np.argsort(-viewers, kind="stable")[:50]]
    shares = []
    for item in popular:
        reply = stub.GetSimilarMedia(pb.GetSimilarMediaRequest(media_id=item, limit=10))
        group = generator.media_group(item, SEED, MEDIA, GROUPS)
        same = [
            generator.media_group(s.media_id, SEED, MEDIA, GROUPS) == group
            for s in reply.similar_media
        ]
        shares.append(sum(same) / len(same))
    assert np.mean(shares) >= 0.7, shares
    assert np.median(shares) >= 0.7, shares


def test_unknown_user_gets_most_watched_as_fallback(deployment: dict) -> None:
    stub, truth = deployment["stub"], deployment["truth"]
    reply = stub.RecommendForUser(pb.RecommendForUserRequest(user_id=10**12, limit=5))
    assert reply.fallback and reply.position.caught_up
    viewers = (truth.w > 0).sum(axis=0)
    total = truth.w.sum(axis=0)
    order = sorted(range(len(truth.items)), key=lambda b: (-viewers[b], -total[b], truth.items[b]))
    assert [r.media_id for r in reply.recommendations] == [truth.items[b] for b in order[:5]]


def test_known_user_gets_unwatched_items(deployment: dict) -> None:
    stub, truth = deployment["stub"], deployment["truth"]
    checked = 0
    for user in truth.users[:50]:
        watched = {truth.items[b] for b in np.flatnonzero(truth.w[truth.row[user]] > 0)}
        if not watched:
            continue
        reply = stub.RecommendForUser(pb.RecommendForUserRequest(user_id=user, limit=10))
        assert not reply.fallback
        ids = [r.media_id for r in reply.recommendations]
        assert ids and not watched.intersection(ids)
        scores = [r.score for r in reply.recommendations]
        assert scores == sorted(scores, reverse=True)
        checked += 1
    assert checked >= 20


def test_errors(deployment: dict) -> None:
    stub = deployment["stub"]
    with pytest.raises(grpc.RpcError) as failure:
        stub.GetSimilarMedia(pb.GetSimilarMediaRequest(media_id=10**12))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as failure:
        stub.GetSimilarMedia(
            pb.GetSimilarMediaRequest(
                media_id=0,
                limit=500,
                metric=cast(pb.SimilarityMetric, 9),  # not a named metric
            )
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {(v.field, v.reason) for v in field_violations_of(failure.value)} == {
        ("media_id", "REQUIRED"),
        ("limit", "OUT_OF_RANGE"),
        ("metric", "UNKNOWN_VALUE"),
    }
    with pytest.raises(grpc.RpcError) as failure:
        stub.RecommendForUser(pb.RecommendForUserRequest(user_id=-4, limit=-1))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {(v.field, v.reason) for v in field_violations_of(failure.value)} == {
        ("user_id", "NOT_POSITIVE"),
        ("limit", "OUT_OF_RANGE"),
    }


def test_restart_answers_the_same_from_rocksdb(deployment: dict, tmp_path: Path) -> None:
    """After SIGTERM and a restart on the same state, answers and position are unchanged."""
    stub, truth, service = deployment["stub"], deployment["truth"], deployment["recommender"]
    item = sample_items(truth)[0]
    request = pb.GetSimilarMediaRequest(
        media_id=item, limit=20, metric=pb.SIMILARITY_METRIC_PEARSON
    )
    before = stub.GetSimilarMedia(request)
    assert service.stop() == 0, service.tail()
    service.start()
    service.wait_serving()
    after = stub.GetSimilarMedia(request, wait_for_ready=True)
    assert list(after.similar_media) == list(before.similar_media)
    assert list(after.position.partitions) == list(before.position.partitions)
