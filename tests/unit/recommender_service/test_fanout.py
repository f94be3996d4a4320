"""The recommender's fan-out adds per-partition partials into exactly the single-instance answer.

One RocksDB holds every partition (OfflineRecommender); the fan-out is told that three
"instances" own parts of them, and the other owners are stubs that answer from the same store
over exactly the partitions asked (through the protobuf messages, as a peer would). Its answers
must equal the single instance's, and brute force's.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from evaluation.offline_recommender import OfflineRecommender
from recommender_service import partials
from recommender_service.fanout import Fanout, Ownership, to_message
from recommender_service.key_layout import stored_items
from recommender_service.query_engine import UnknownItem, window_of
from recommender_service.servicer import warmer_ready
from recommender_service.settings import RecommenderSettings
from recommender_service.similarity import Metric
from tests.support.oracles import BruteForce, assert_same_ranking
from viewevents import scatter
from viewevents.v1 import recommender_partition_service_pb2 as ppb
from viewevents.v1 import view_event_pb2 as ve

OWNERS = {0: "a", 1: "a", 2: "b", 3: "c"}


def events(seed: int, users: int, items: int, count: int) -> list[ve.ViewEvent]:
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(items)]
    out: list[ve.ViewEvent] = []
    while len(out) < count:
        user, media = rng.randint(1, users), rng.choices(range(1, items + 1), weights)[0]
        kinds = [ve.EVENT_TYPE_STREAM_START] + [ve.EVENT_TYPE_WAYPOINT] * rng.choice([0, 1, 2, 5])
        for kind in kinds + [ve.EVENT_TYPE_STREAM_END]:
            out.append(
                ve.ViewEvent(
                    event_id=f"{seed}-{len(out)}",
                    media_id=media,
                    user_id=user,
                    event_type=kind,
                    event_time=Timestamp(seconds=1_700_000_000 + len(out)),
                )
            )
    return out


class PeerStub:
    """A peer that answers from the shared store over exactly the partitions asked."""

    def __init__(self, rec: OfflineRecommender, address: str, down: bool = False) -> None:
        self.rec, self.address, self.down = rec, address, down

    async def GetItemPartials(
        self, request: ppb.GetItemPartialsRequest, **_: Any
    ) -> ppb.GetItemPartialsResponse:
        if self.down:
            raise scatter.OwnerUnavailable("down")
        assert {OWNERS[p] for p in request.partitions} == {self.address}
        return to_message(
            partials.read(
                self.rec.processor.view,
                list(request.partitions),
                request.media_id,
                list(request.item_ids),
                request.all_items,
            )
        )

    async def GetUserWindow(
        self, request: ppb.GetUserWindowRequest, **_: Any
    ) -> ppb.GetUserWindowResponse:
        assert {OWNERS[p] for p in request.partitions} == {self.address}
        found = window_of(
            self.rec.processor.view.snapshot, sorted(request.partitions), request.user_id
        )
        if found is None:
            return ppb.GetUserWindowResponse(found=False)
        return ppb.GetUserWindowResponse(
            found=True,
            media_ids=found.media,
            weights=found.weights,
            watched_media_ids=found.watched.tolist(),
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = RecommenderSettings(
        history_cap=10_000,
        min_co_viewers=1,
        shrinkage=0.0,
        max_limit=100,
        row_max_deltas=3,
        cache_ttl_seconds=0.0,
        user_items=50,
    )
    feed = events(4, 150, 60, 6_000)
    rec = OfflineRecommender(
        str(tmp_path_factory.mktemp("fanout") / "state"), settings, partitions=4, batch_max=300
    )
    rec.feed(feed)
    consumer = SimpleNamespace(
        address="a", owners=dict(OWNERS), answerable=lambda: frozenset({0, 1})
    )
    fanout = Fanout(Ownership(lambda: rec.processor.view, consumer), settings)
    stubs = {a: PeerStub(rec, a) for a in ("b", "c")}
    fanout._stub = lambda address: stubs[address]  # type: ignore[method-assign,assignment,return-value]
    yield rec, fanout, stubs, BruteForce(feed)
    rec.close()


def test_similar_equals_the_single_instance_and_brute_force(setup: Any) -> None:
    rec, fanout, _, truth = setup
    for item in truth.items[:40]:
        for metric in Metric:
            got, position = asyncio.run(fanout.similar(int(item), metric, 25))
            want, _ = rec.engine.similar(int(item), metric, 25)
            assert got.ids.tolist() == want.ids.tolist()
            assert got.scores.tolist() == want.scores.tolist()
            assert got.co_viewers.tolist() == want.co_viewers.tolist()
            assert_same_ranking(
                got.ids.tolist(),
                got.scores.tolist(),
                got.co_viewers.tolist(),
                truth.scores(int(item), metric),
                25,
            )
            assert [p.partition for p in position.partitions] == [0, 1, 2, 3]


def test_recommend_equals_the_single_instance(setup: Any) -> None:
    rec, fanout, _, truth = setup
    for user in [int(u) for u in truth.users[:30]] + [10**12]:
        ids, scores, fallback, _ = asyncio.run(fanout.recommend(user, 10))
        want = rec.engine.recommend(user, 10)
        assert (ids.tolist(), scores.tolist(), fallback) == (
            want.ids.tolist(),
            want.scores.tolist(),
            want.fallback,
        )


def test_unknown_item_and_a_missing_owner(setup: Any) -> None:
    _, fanout, stubs, truth = setup
    with pytest.raises(UnknownItem):
        asyncio.run(fanout.similar(10**12, Metric.COSINE, 5))
    stubs["c"].down = True
    try:
        with pytest.raises(scatter.Incomplete) as failure:
            asyncio.run(fanout.similar(int(truth.items[0]), Metric.COSINE, 5))
        assert list(failure.value.missing) == [3]
    finally:
        stubs["c"].down = False


def test_partials_add_up_to_the_whole(setup: Any) -> None:
    rec, _, _, _ = setup
    view = rec.processor.view
    whole = partials.read(view, [0, 1, 2, 3], all_items=True)  # the in-memory table
    parts = [partials.read(view, ps, all_items=True) for ps in ([0], [1, 2], [3])]  # RocksDB
    summed = partials.add_items([p.items for p in parts])
    for name in ("ids", "s", "q", "n"):
        assert np.array_equal(getattr(summed, name), getattr(whole.items, name))
    assert sum(p.users for p in parts) == whole.users == view.users


def _assert_sums_are_stored(
    got: partials.ItemPartials, store: Any, parts: list[int], wanted: Any
) -> None:
    users, stored = stored_items(store, parts)
    expected = {m: stored[m] for m in (stored if wanted is None else wanted) if m in stored}
    assert got.items.ids.tolist() == sorted(expected)
    assert list(zip(got.items.s.tolist(), got.items.q.tolist(), got.items.n.tolist())) == [
        expected[m] for m in sorted(expected)
    ]
    assert got.users == users


def test_item_sums_of_some_partitions_equal_the_stored_records(setup: Any) -> None:
    """An instance asked for fewer partitions than its store holds (after a rebalance) gives
    exactly the stored records' sums, against a scan of the store: by point reads at first,
    then from the table minus the other partitions' sums once those stand still; unknown ids
    and items absent from some partitions included."""
    rec, _, _, truth = setup
    view = rec.processor.view
    rng = random.Random(5)
    known = [int(m) for m in truth.items]
    for parts in ([0], [1, 2], [3], [0, 2, 3]):
        remainder = partials.Remainder()
        for _ in range(3):
            wanted = sorted(set(rng.sample(known, 25) + [10**9, 10**12]))
            got = partials.read(view, parts, item_ids=wanted, remainder=remainder)
            _assert_sums_are_stored(got, rec.store, parts, wanted)
            every = partials.read(view, parts, all_items=True, remainder=remainder)
            _assert_sums_are_stored(every, rec.store, parts, None)
        assert remainder.reads == 1  # read once the others stood still, then reused


def test_the_remainder_follows_partitions_that_move(tmp_path: Path) -> None:
    """Sums of the other partitions are never reused once those partitions apply more events
    (new offsets): answers stay equal to the stored records as the stream goes on."""
    settings = RecommenderSettings(
        history_cap=10_000, min_co_viewers=1, shrinkage=0.0, max_limit=100, row_max_deltas=3
    )
    rec = OfflineRecommender(str(tmp_path / "state"), settings, partitions=4, batch_max=200)
    try:
        feed = events(8, 80, 40, 3_000)
        remainder = partials.Remainder()
        for start in range(0, len(feed), 500):
            rec.feed(feed[start : start + 500])
            view = rec.processor.view
            for _ in range(2):
                got = partials.read(view, [1, 3], all_items=True, remainder=remainder)
                _assert_sums_are_stored(got, rec.store, [1, 3], None)
        assert remainder.reads >= 2
    finally:
        rec.close()


def test_cached_lists_follow_new_events(tmp_path: Path) -> None:
    """A repeated query is served from the cache; after new events (which move some partition's
    offset) the answer reflects them: equal to the single instance and to brute force over
    everything fed, never the cached list of the older state."""
    settings = RecommenderSettings(min_co_viewers=1, cache_ttl_seconds=0.0)
    first, later = events(8, 120, 40, 3_000), events(9, 120, 40, 3_000)
    rec = OfflineRecommender(str(tmp_path / "state"), settings, partitions=4, batch_max=500)
    try:
        rec.feed(first)
        consumer = SimpleNamespace(
            address="a", owners=dict(OWNERS), answerable=lambda: frozenset({0, 1})
        )
        fanout = Fanout(Ownership(lambda: rec.processor.view, consumer), settings)
        stubs = {a: PeerStub(rec, a) for a in ("b", "c")}
        fanout._stub = lambda address: stubs[address]  # type: ignore[method-assign,assignment,return-value]
        item = int(BruteForce(first).items[0])
        before, old_position = asyncio.run(fanout.similar(item, Metric.COSINE, 25))
        again, _ = asyncio.run(fanout.similar(item, Metric.COSINE, 25))
        assert fanout.cache.hits == 1 and again.ids.tolist() == before.ids.tolist()

        rec.feed(later)
        truth = BruteForce(first + later)
        for metric in Metric:
            got, position = asyncio.run(fanout.similar(item, metric, 25))
            want, _ = rec.engine.similar(item, metric, 25)
            assert (got.ids.tolist(), got.scores.tolist(), got.co_viewers.tolist()) == (
                want.ids.tolist(),
                want.scores.tolist(),
                want.co_viewers.tolist(),
            )
            assert_same_ranking(
                got.ids.tolist(),
                got.scores.tolist(),
                got.co_viewers.tolist(),
                truth.scores(item, metric),
                25,
            )
            assert position != old_position
        assert got.scores.tolist() != before.scores.tolist()  # the new events changed the list
        ids, scores, _, _ = asyncio.run(fanout.recommend(int(truth.users[0]), 10))
        wanted = rec.engine.recommend(int(truth.users[0]), 10)
        assert (ids.tolist(), scores.tolist()) == (wanted.ids.tolist(), wanted.scores.tolist())
    finally:
        rec.close()


def test_the_cache_warmer_waits_for_every_partition() -> None:
    """Lists of a partial local view are never read (queries fan out), so an instance that owns
    only some partitions, or is still replaying one, does not warm them."""
    caught_up = SimpleNamespace(is_set=lambda: True)
    alone = SimpleNamespace(
        caught_up=caught_up,
        owns_all=lambda: True,
        owners={0: "a", 1: "a"},
        answerable=lambda: frozenset({0, 1}),
    )
    shared = SimpleNamespace(
        caught_up=caught_up, owns_all=lambda: False, owners=dict(OWNERS), answerable=frozenset
    )
    replaying = SimpleNamespace(
        caught_up=caught_up,
        owns_all=lambda: True,
        owners={0: "a", 1: "a"},
        answerable=lambda: frozenset({0}),
    )
    behind = SimpleNamespace(**{**vars(alone), "caught_up": SimpleNamespace(is_set=lambda: False)})
    assert warmer_ready(alone)()
    assert not warmer_ready(shared)()
    assert not warmer_ready(replaying)()
    assert not warmer_ready(behind)()


def test_warming_fills_the_cache_with_exact_lists_once_the_offsets_stand_still(
    setup: Any,
) -> None:
    """An instance answering by fan-out warms its cache after a quiet spell; the queries that
    follow are cache hits and equal the single instance's answers."""
    rec, shared, stubs, truth = setup
    fanout = Fanout(shared.ownership, shared.settings)
    fanout._stub = lambda address: stubs[address]  # type: ignore[method-assign]
    items = [int(m) for m in truth.items[:20]] + [10**12]  # an unknown item is skipped

    async def scenario() -> None:
        task = asyncio.create_task(fanout.keep_warm(lambda: True, lambda: items, 0.0, 0.01))
        try:
            for _ in range(500):
                if len(fanout.cache) == 20:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
        assert len(fanout.cache) == 20
        misses = fanout.cache.misses
        for item in items[:20]:
            got, _ = await fanout.similar(item, Metric.COSINE, 25)
            want, _ = rec.engine.similar(item, Metric.COSINE, 25)
            assert got.ids.tolist() == want.ids.tolist()
            assert got.scores.tolist() == want.scores.tolist()
        assert fanout.cache.misses == misses  # every one served from the warmed cache

    asyncio.run(scenario())
    fanout.cache.clear()
    state = asyncio.run(fanout.probe())
    assert asyncio.run(fanout.warm(state, items[:5])) == 5
    assert asyncio.run(fanout.warm(state, items[:5])) == 0  # already there
