"""Recommender maths and state without Kafka, against a brute-force numpy user x item matrix.

The brute force (tests/support/oracles.py) never uses the service's code: it builds the dense matrix of waypoints per
(user, item) from the raw events (first copy of each event id), then takes cosine from W^T W and
Pearson from np.corrcoef over every user seen (missing = 0). The service side runs the real
processor and query engine in-process (evaluation.offline_recommender), batch by batch.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from evaluation.offline_recommender import OfflineRecommender
from recommender_service import batch_plan
from recommender_service import key_layout as keys
from recommender_service.batch_plan import COMPACT_MIN_ENTRIES
from recommender_service.servicer import position_message, validate_recommend, validate_similar
from recommender_service.settings import RecommenderSettings
from recommender_service.similarity import Metric
from tests.support.oracles import BruteForce, assert_same_ranking
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import view_event_pb2 as ve


def random_events(
    seed: int, users: int, items: int, count: int, dup_share: float = 0.03
) -> list[ve.ViewEvent]:
    """Skewed random sessions (start, waypoints, stop/end), some users never past a start, and
    re-sent duplicates."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(items)]
    events: list[ve.ViewEvent] = []
    n = 0
    while len(events) < count:
        user = rng.randint(1, users)
        media = rng.choices(range(1, items + 1), weights)[0]
        kinds = [ve.EVENT_TYPE_STREAM_START] + [ve.EVENT_TYPE_WAYPOINT] * rng.choice(
            [0, 1, 1, 2, 3, 5, 8]
        )
        kinds.append(rng.choice([ve.EVENT_TYPE_STREAM_STOP, ve.EVENT_TYPE_STREAM_END]))
        for kind in kinds:
            n += 1
            events.append(
                ve.ViewEvent(
                    event_id=f"{seed}-{n}",
                    media_id=media,
                    user_id=user,
                    event_type=kind,
                    event_time=Timestamp(seconds=1_700_000_000 + n),
                )
            )
            if rng.random() < dup_share:
                events.append(rng.choice(events))
    # Interleave sessions like concurrent players do (order within a user does not matter).
    rng.shuffle(events)
    return events


class SettingsFields(TypedDict, total=False):
    """The RecommenderSettings fields these tests set."""

    history_cap: int
    min_co_viewers: int
    shrinkage: float
    max_limit: int
    user_items: int
    row_max_deltas: int
    cache_ttl_seconds: float


def settings(**changes: Unpack[SettingsFields]) -> RecommenderSettings:
    base = SettingsFields(
        history_cap=10_000,
        min_co_viewers=1,
        shrinkage=0.0,
        max_limit=100,
        row_max_deltas=3,
        cache_ttl_seconds=0.0,
    )
    base.update(changes)
    return RecommenderSettings(**base)


def run(
    tmp_path: Path,
    events: list[ve.ViewEvent],
    batch: int,
    partitions: int = 4,
    **changes: Unpack[SettingsFields],
) -> OfflineRecommender:
    rec = OfflineRecommender(
        str(tmp_path / "state"), settings(**changes), partitions=partitions, batch_max=batch
    )
    rec.feed(events)
    return rec


def all_partitions(rec: OfflineRecommender) -> list[int]:
    return list(range(rec.partitions))


# --- exact incremental statistics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,batch,partitions,base_min",
    [
        (1, 37, 4, COMPACT_MIN_ENTRIES),
        (2, 500, 3, COMPACT_MIN_ENTRIES),
        (3, 5000, 1, 8),
        (6, 37, 4, 8),
    ],
)
def test_stored_statistics_equal_brute_force(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    batch: int,
    partitions: int,
    base_min: int,
) -> None:
    # Rows here have at most 40 neighbours: with the default minimum only minor compactions
    # (delta chunks merged) happen; a small minimum makes bases be rewritten too.
    monkeypatch.setattr(batch_plan, "COMPACT_MIN_ENTRIES", base_min)
    events = random_events(seed, users=120, items=40, count=6000)
    rec = run(tmp_path, events, batch, partitions)
    done = rec.processor.stats
    print(f"compactions {done.compactions}, of which base rewrites {done.base_rewrites}")
    if base_min < COMPACT_MIN_ENTRIES:
        assert done.base_rewrites > 0
    else:
        assert done.compactions > done.base_rewrites
    truth = BruteForce(events)
    users, items = keys.stored_items(rec.store, all_partitions(rec))
    assert users == truth.n_users
    assert items == truth.item_stats()
    assert keys.stored_pairs(rec.store, all_partitions(rec)) == truth.pairs()
    view = rec.processor.view  # the in-memory table agrees with RocksDB
    assert view.users == users
    assert {
        int(m): (int(s), int(q), int(n)) for m, s, q, n in zip(view.ids, view.s, view.q, view.n)
    } == items
    rec.close()


@pytest.mark.parametrize("seed", [4, 5])
def test_every_returned_pair_equals_numpy_for_both_metrics(tmp_path: Path, seed: int) -> None:
    events = random_events(seed, users=150, items=45, count=8000)
    rec = run(tmp_path, events, batch=211)
    truth = BruteForce(events)
    for item in truth.items:
        for metric in Metric:
            ranked, _ = rec.engine.similar(item, metric, 100)
            expected = truth.scores(item, metric)
            assert_same_ranking(
                ranked.ids.tolist(),
                ranked.scores.tolist(),
                ranked.co_viewers.tolist(),
                expected,
                100,
            )
            short, _ = rec.engine.similar(item, metric, 7)
            assert short.ids.tolist() == ranked.ids.tolist()[:7]
    rec.close()


def test_restart_loads_the_same_state_and_continues_exactly(tmp_path: Path) -> None:
    events = random_events(6, users=100, items=30, count=6000)
    half = len(events) // 2
    rec = run(tmp_path, events[:half], batch=300)
    rec.close()
    again = OfflineRecommender(str(tmp_path / "state"), settings(), batch_max=300)
    again.feed(events[half:])
    truth = BruteForce(events)
    assert keys.stored_items(again.store, all_partitions(again)) == (
        truth.n_users,
        truth.item_stats(),
    )
    assert keys.stored_pairs(again.store, all_partitions(again)) == truth.pairs()
    view = again.processor.view
    assert view.users == truth.n_users and len(view.ids) == len(truth.items)
    again.close()


def test_ties_are_broken_by_media_id(tmp_path: Path) -> None:
    """Items 10..15 are each watched by one user for 2 waypoints, who also watched item 1 for
    2: their cosine with item 1 is exactly equal, so they must come in id order."""
    events: list[ve.ViewEvent] = []
    n = 0

    def watch(user: int, media: int, waypoints: int) -> None:
        nonlocal n
        for kind in [ve.EVENT_TYPE_STREAM_START] + [ve.EVENT_TYPE_WAYPOINT] * waypoints:
            n += 1
            events.append(
                ve.ViewEvent(
                    event_id=f"t{n}",
                    media_id=media,
                    user_id=user,
                    event_type=kind,
                    event_time=Timestamp(seconds=1_700_000_000 + n),
                )
            )

    for media in (15, 12, 14, 10, 13, 11):  # feed order must not matter
        user = 100 + media
        watch(user, 1, 2)
        watch(user, media, 2)
    watch(999, 1, 3)
    random.Random(7).shuffle(events)
    rec = run(tmp_path, events, batch=5)
    ranked, _ = rec.engine.similar(1, Metric.COSINE, 10)
    assert ranked.ids.tolist() == [10, 11, 12, 13, 14, 15]
    assert len(set(ranked.scores.tolist())) == 1
    rec.close()


def test_cap_binding_keeps_item_sums_exact_and_pairs_below_truth(tmp_path: Path) -> None:
    """With a window of 3 items, pairs with items beyond it are not updated (approximate,
    never above the truth), while S, Q, n and N stay exact, also for items that re-enter."""
    events = random_events(8, users=20, items=30, count=5000)
    rec = run(tmp_path, events, batch=50, history_cap=3)
    truth = BruteForce(events)
    assert keys.stored_items(rec.store, all_partitions(rec)) == (truth.n_users, truth.item_stats())
    stored = keys.stored_pairs(rec.store, all_partitions(rec))
    exact = truth.pairs()
    assert set(stored) <= set(exact)
    assert all(stored[p][0] <= exact[p][0] and stored[p][1] <= exact[p][1] for p in stored)
    assert stored != exact  # the cap really did bind in this set-up
    for user in truth.users:  # every window respects the cap
        for partition in all_partitions(rec):
            value = rec.store.get(keys.user_key(partition, user))
            if value:
                assert len(keys.decode_window(value)[0]) <= 3
    rec.close()


# --- support rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("min_co,shrinkage", [(3, 0.0), (1, 5.0), (2, 2.5)])
def test_min_co_viewers_and_shrinkage(tmp_path: Path, min_co: int, shrinkage: float) -> None:
    events = random_events(9, users=150, items=40, count=8000)
    rec = run(tmp_path, events, batch=400, min_co_viewers=min_co, shrinkage=shrinkage)
    truth = BruteForce(events)
    for item in truth.items[:20]:
        for metric in Metric:
            ranked, _ = rec.engine.similar(item, metric, 15)
            expected = truth.scores(item, metric, min_co, shrinkage)
            assert all(c >= min_co for c in ranked.co_viewers.tolist())
            assert_same_ranking(
                ranked.ids.tolist(),
                ranked.scores.tolist(),
                ranked.co_viewers.tolist(),
                expected,
                15,
            )
    rec.close()


def test_a_pair_seen_by_one_user_does_not_top_the_list_by_default(tmp_path: Path) -> None:
    """Item 1 is watched by many users with item 2, and by one user with item 3 only: raw
    cosine would put 3 first; the default support (2 co-viewers) leaves it out."""
    events: list[ve.ViewEvent] = []
    n = 0
    for user in range(1, 40):
        for media, wp in ((1, 1 + user % 3), (2, 1 + user % 2)):
            for kind in [ve.EVENT_TYPE_STREAM_START] + [ve.EVENT_TYPE_WAYPOINT] * wp:
                n += 1
                events.append(
                    ve.ViewEvent(
                        event_id=f"s{n}",
                        media_id=media,
                        user_id=user,
                        event_type=kind,
                        event_time=Timestamp(seconds=1_700_000_000 + n),
                    )
                )
    for media in (1, 3):
        for _ in range(30):
            n += 1
            events.append(
                ve.ViewEvent(
                    event_id=f"s{n}",
                    media_id=media,
                    user_id=500,
                    event_type=ve.EVENT_TYPE_WAYPOINT,
                    event_time=Timestamp(seconds=1_700_000_000 + n),
                )
            )
    raw = run(tmp_path / "raw", events, batch=50)
    assert raw.engine.similar(1, Metric.COSINE, 10)[0].ids.tolist()[0] == 3
    raw.close()
    default = OfflineRecommender(str(tmp_path / "default"), RecommenderSettings())
    default.feed(events)
    ranked, _ = default.engine.similar(1, Metric.COSINE, 10)
    assert ranked.ids.tolist() == [2]
    default.close()


# --- user recommendations ------------------------------------------------------------------------


def test_recommendations_are_view_time_weighted_cosine_of_unwatched_items(tmp_path: Path) -> None:
    events = random_events(10, users=80, items=30, count=6000)
    rec = run(tmp_path, events, batch=250, user_items=1_000)
    truth = BruteForce(events)
    checked = 0
    for user in truth.users:
        w = truth.w[truth.row[user]]
        result = rec.engine.recommend(user, 10)
        if not (w > 0).any():
            assert result.fallback
            continue
        # Every neighbour list is complete here (30 items < max_limit), so the score is
        # sum_w v_uw cos(w, c) / sum_w v_uw over all the user's watched items w.
        watched = np.flatnonzero(w > 0)
        with np.errstate(invalid="ignore"):
            cos = np.nan_to_num(truth.cos[watched])
        expected = (w[watched] @ cos) / w[watched].sum()
        expected_map = {
            truth.items[b]: (float(expected[b]), 0)
            for b in range(len(truth.items))
            if w[b] == 0 and expected[b] > 0
        }
        if not expected_map:
            assert result.fallback
            continue
        assert not result.fallback
        assert_same_ranking(
            result.ids.tolist(), result.scores.tolist(), [0] * len(result.ids), expected_map, 10
        )
        checked += 1
    assert checked > 30
    rec.close()


def test_unknown_user_gets_the_most_watched_items(tmp_path: Path) -> None:
    events = random_events(11, users=60, items=25, count=3000)
    rec = run(tmp_path, events, batch=500)
    truth = BruteForce(events)
    result = rec.engine.recommend(10_000, 5)
    assert result.fallback
    viewers = (truth.w > 0).sum(axis=0)
    total = truth.w.sum(axis=0)
    order = sorted(range(len(truth.items)), key=lambda b: (-viewers[b], -total[b], truth.items[b]))
    assert result.ids.tolist() == [truth.items[b] for b in order[:5]]
    assert result.scores.tolist() == [float(viewers[b]) for b in order[:5]]
    rec.close()


def test_unknown_item_is_reported(tmp_path: Path) -> None:
    from recommender_service.query_engine import UnknownItem

    rec = run(tmp_path, random_events(12, users=10, items=5, count=200), batch=50)
    with pytest.raises(UnknownItem):
        rec.engine.similar(10_000, Metric.COSINE, 10)
    rec.close()


def test_an_answer_never_claims_a_partition_its_state_lacks(tmp_path: Path) -> None:
    """A partition whose first batch commits after the answer's state was read is reported at
    offset 0, not at the consumer's position by the time the answer is sent (seen in the
    scale-out test: co-viewer counts below brute force at the position an answer claimed)."""
    rec = OfflineRecommender(str(tmp_path / "state"), settings(), partitions=2, batch_max=500)
    try:
        events = random_events(13, users=80, items=20, count=3_000)
        first = [e for e in events if rec.partition_of(e.user_id) == 0]
        later = [e for e in events if rec.partition_of(e.user_id) == 1]
        assert first and later
        rec.feed(first)
        media = int(rec.processor.view.ids[0])
        _, stamp = rec.engine.similar(media, Metric.COSINE, 10)
        rec.feed(later)  # partition 1's first batches commit while the answer is on its way
        assert set(rec.consumer.positions) == {0, 1}
        position = position_message(stamp, rec.consumer)
        # Records are numbered from 0 per partition as they are fed: the answer's state holds
        # every record of partition 0 and none of partition 1.
        assert {p.partition: p.offset for p in position.partitions} == {0: len(first), 1: 0}
    finally:
        rec.close()


# --- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_kwargs,expected",
    [
        (dict(media_id=5), set()),
        (dict(media_id=5, limit=100, metric=pb.SIMILARITY_METRIC_PEARSON), set()),
        (dict(media_id=0), {("media_id", "REQUIRED")}),
        (dict(media_id=-3), {("media_id", "NOT_POSITIVE")}),
        (dict(media_id=5, limit=-1), {("limit", "OUT_OF_RANGE")}),
        (dict(media_id=5, limit=101), {("limit", "OUT_OF_RANGE")}),
        (dict(media_id=5, metric=7), {("metric", "UNKNOWN_VALUE")}),
        (
            dict(media_id=-1, limit=1000, metric=3),
            {("media_id", "NOT_POSITIVE"), ("limit", "OUT_OF_RANGE"), ("metric", "UNKNOWN_VALUE")},
        ),
    ],
)
def test_similar_request_validation(request_kwargs: dict, expected: set) -> None:
    violations = validate_similar(pb.GetSimilarMediaRequest(**request_kwargs), 100)
    assert {(v.field, v.reason) for v in violations} == expected
    assert all(v.description for v in violations)


@pytest.mark.parametrize(
    "request_kwargs,expected",
    [
        (dict(user_id=1), set()),
        (dict(user_id=1, limit=100), set()),
        (dict(user_id=0), {("user_id", "REQUIRED")}),
        (dict(user_id=-9, limit=-2), {("user_id", "NOT_POSITIVE"), ("limit", "OUT_OF_RANGE")}),
        (dict(user_id=1, limit=101), {("limit", "OUT_OF_RANGE")}),
    ],
)
def test_recommend_request_validation(request_kwargs: dict, expected: set) -> None:
    violations = validate_recommend(pb.RecommendForUserRequest(**request_kwargs), 100)
    assert {(v.field, v.reason) for v in violations} == expected


def test_rows_newer_than_the_view_are_tolerated(tmp_path: Path) -> None:
    """rocksdict's snapshot iterators read current data, so a row can name neighbours that the
    view a query holds does not know yet (seen in the service under ingestion: a crash)."""
    rec = run(tmp_path, random_events(5, users=60, items=12, count=3_000), batch=500)
    try:
        old_view = rec.processor.view
        rec.feed(random_events(6, users=60, items=40, count=3_000))  # new items 13..40 appear
        assert len(rec.processor.view.ids) > len(old_view.ids)
        assert list(old_view.positions_of(np.array([old_view.ids[0], 10_000, -1]))) == [0, -1, -1]
        for media in old_view.ids.tolist():
            pos = old_view.position_of(media)
            assert pos is not None  # one of the view's own ids
            ranked = rec.engine.compute(old_view, media, pos)
            for result in ranked.values():
                assert set(result.ids.tolist()) <= set(old_view.ids.tolist())
    finally:
        rec.close()
