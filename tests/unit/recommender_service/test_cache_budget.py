"""The recommender's neighbour-list cache is charged to the memory budget."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from recommender_service.fanout import Fanout, Ownership
from recommender_service.fanout_cache import ListCache, Lists
from recommender_service.hot_rows import HotRows
from recommender_service.query_engine import QueryEngine, _Entry
from recommender_service.servicer import RecommenderServicer
from recommender_service.settings import cache_items_for, cached_item_bytes, from_config
from recommender_service.similarity import Metric, Ranked
from recommender_service.view import Stamp
from viewevents.memory import MiB
from viewevents.v1.view_event_pb2 import ConsumerPosition
from viewevents_tools import settings_catalogue as settings


def test_the_recommender_cache_is_sized_by_the_budget_unless_set() -> None:
    assert cached_item_bytes(100) == 6_372
    default = from_config(settings.load(env={}))
    assert default.cache_items == 20 * MiB // 6_372 == cache_items_for(20, 100)
    bigger = from_config(settings.load(env={"VIEWEVENTS_MEMORY_BUDGET_MB": "400"}))
    assert bigger.cache_items == cache_items_for(40, 100)
    explicit = from_config(settings.load(env={"VIEWEVENTS_RECOMMENDER_CACHE_ITEMS": "500"}))
    assert explicit.cache_items == 500


def test_hot_rows_take_the_side_cache_and_fanout_lists_the_list_cache_share() -> None:
    default = from_config(settings.load(env={}))
    assert default.hot_rows_mb == 10  # the 10 MiB side cache at a 200 MiB budget
    # The fan-out lists use the share of the instance's own lists: one of the two at a time.
    assert default.fanout_cache_items == default.cache_items == 20 * MiB // 6_372
    bigger = from_config(settings.load(env={"VIEWEVENTS_MEMORY_BUDGET_MB": "400"}))
    assert (bigger.hot_rows_mb, bigger.fanout_cache_items) == (20, 40 * MiB // 6_372)
    own = from_config(settings.load(env={"VIEWEVENTS_RECOMMENDER_CACHE_ITEMS": "500"}))
    assert own.fanout_cache_items == 500
    explicit = from_config(
        settings.load(
            env={
                "VIEWEVENTS_RECOMMENDER_HOT_ROWS_MB": "3",
                "VIEWEVENTS_RECOMMENDER_FANOUT_CACHE_ITEMS": "0",
            }
        )
    )
    assert (explicit.hot_rows_mb, explicit.fanout_cache_items) == (3, 0)  # 0: fan-out cache off


def _lists(n: int) -> dict[Metric, Ranked]:
    ids = np.arange(n, dtype=np.int64)
    return {m: Ranked(ids, ids.astype(np.float64), ids.copy()) for m in Metric}


def test_the_memory_report_counts_what_the_list_caches_hold() -> None:
    options = from_config(settings.load(env={}))
    engine = QueryEngine(lambda: None, options)  # type: ignore[arg-type, return-value]
    stamp = Stamp(1, {0: 1}, None)
    for media, n in ((1, 100), (2, 10), (3, 0)):
        engine._cache[media] = _Entry(1, 0.0, _lists(n), stamp)
    fanout = ListCache(10)
    fanout.observe(((0, 1),))
    fanout.put(((0, 1),), 7, Lists(_lists(50), ConsumerPosition()))
    # each item: 2 metrics x 3 arrays of 8-byte values, plus the fixed per-item overhead
    expected_lists = sum(cached_item_bytes(0) + 2 * 3 * 8 * n for n in (100, 10, 0))
    assert engine.cache_bytes() == expected_lists
    assert fanout.bytes() == cached_item_bytes(0) + 2 * 3 * 8 * 50
    hot = HotRows(100)
    servicer = RecommenderServicer(engine, None, None, hot)
    assert servicer.memory_bytes() == {"lists": expected_lists, "hot_rows": hot.bytes}


def test_an_instance_keeps_only_the_list_cache_of_the_way_it_answers() -> None:
    """The instance's own lists and the fan-out lists share one memory share: answering from
    the local view drops the fan-out lists, and fanning out drops the local ones."""
    options = from_config(settings.load(env={}))
    engine = QueryEngine(lambda: None, options)  # type: ignore[arg-type, return-value]
    engine._cache[1] = _Entry(1, 0.0, _lists(10), Stamp(1, {0: 1}, None))
    consumer = SimpleNamespace(owns_all=lambda: False, owners={0: "a", 1: "b"})
    fanout = Fanout(Ownership(lambda: None, consumer), options)  # type: ignore[arg-type, return-value]
    servicer = RecommenderServicer(engine, consumer, fanout)
    assert not servicer._owns_all()
    assert engine.cached_items() == 0
    fanout.cache.observe(((0, 1), (1, 1)))
    fanout.cache.put(((0, 1), (1, 1)), 7, Lists(_lists(10), ConsumerPosition()))
    engine._cache[1] = _Entry(1, 0.0, _lists(10), Stamp(1, {0: 1}, None))
    consumer.owns_all = lambda: True
    consumer.owners = {0: "a", 1: "a"}
    assert servicer._owns_all()
    assert len(fanout.cache) == 0 and engine.cached_items() == 1
