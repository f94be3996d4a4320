"""The recommender's neighbour-list cache is charged to the memory budget."""

from __future__ import annotations

from recommender_service.settings import cache_items_for, cached_item_bytes, from_config
from viewevents.memory import MiB
from viewevents_tools import settings_catalogue as settings


def test_the_recommender_cache_is_sized_by_the_budget_unless_set() -> None:
    assert cached_item_bytes(100) == 6_372
    default = from_config(settings.load(env={}))
    assert default.cache_items == 20 * MiB // 6_372 == cache_items_for(20, 100)
    bigger = from_config(settings.load(env={"VIEWEVENTS_MEMORY_BUDGET_MB": "400"}))
    assert bigger.cache_items == cache_items_for(40, 100)
    explicit = from_config(settings.load(env={"VIEWEVENTS_RECOMMENDER_CACHE_ITEMS": "500"}))
    assert explicit.cache_items == 500


def test_hot_rows_and_fanout_lists_are_charged_to_the_side_cache_share() -> None:
    default = from_config(settings.load(env={}))
    assert default.hot_rows_mb == 7  # 70 % of the 10 MiB side cache at a 200 MiB budget
    assert default.fanout_cache_items == 3 * MiB // cached_item_bytes(100) == 493
    bigger = from_config(settings.load(env={"VIEWEVENTS_MEMORY_BUDGET_MB": "400"}))
    assert (bigger.hot_rows_mb, bigger.fanout_cache_items) == (14, 6 * MiB // 6_372)
    explicit = from_config(
        settings.load(
            env={
                "VIEWEVENTS_RECOMMENDER_HOT_ROWS_MB": "3",
                "VIEWEVENTS_RECOMMENDER_FANOUT_CACHE_ITEMS": "0",
            }
        )
    )
    assert (explicit.hot_rows_mb, explicit.fanout_cache_items) == (3, 0)  # 0: fan-out cache off
