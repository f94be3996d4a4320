"""The fan-out's list cache serves only the state its lists were computed from."""

from __future__ import annotations

import numpy as np

from recommender_service.fanout_cache import ListCache, Lists, not_newer, offsets_key
from recommender_service.similarity import Metric, Ranked
from viewevents.v1 import view_event_pb2 as ve


def lists(tag: int) -> Lists:
    ranked = Ranked(np.array([tag]), np.array([0.5]), np.array([1]))
    return Lists({Metric.COSINE: ranked, Metric.PEARSON: ranked}, ve.ConsumerPosition())


OLD = offsets_key({0: 5, 1: 7})
NEW = offsets_key({0: 5, 1: 8})


def test_a_hit_needs_exactly_the_state_the_lists_came_from() -> None:
    cache = ListCache(10)
    cache.observe(OLD)
    cache.put(OLD, 1, lists(1))
    assert cache.get(OLD, 1) == lists(1)
    assert cache.get(NEW, 1) is None
    assert cache.get(OLD, 2) is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_a_newer_state_drops_every_entry_and_an_older_probe_changes_nothing() -> None:
    cache = ListCache(10)
    cache.observe(OLD)
    cache.put(OLD, 1, lists(1))
    cache.observe(NEW)  # an event arrived in partition 1
    assert len(cache) == 0 and cache.get(OLD, 1) is None
    cache.put(OLD, 1, lists(1))  # computed before the event: not kept
    assert len(cache) == 0
    cache.put(NEW, 1, lists(2))
    cache.observe(OLD)  # a probe sent before the event, finishing late
    assert cache.state == NEW and cache.get(NEW, 1) == lists(2)


def test_other_partitions_are_a_new_state() -> None:
    assert not_newer(OLD, NEW) and not not_newer(NEW, OLD)
    other = offsets_key({0: 5, 1: 7, 2: 0})
    assert not not_newer(other, OLD)
    cache = ListCache(10)
    cache.observe(OLD)
    cache.put(OLD, 1, lists(1))
    cache.observe(other)
    assert len(cache) == 0


def test_bounded_least_recently_used_first_and_zero_is_off() -> None:
    cache = ListCache(2)
    cache.observe(OLD)
    for media in (1, 2):
        cache.put(OLD, media, lists(media))
    assert cache.get(OLD, 1) is not None  # 2 is now the least recently used
    cache.put(OLD, 3, lists(3))
    assert len(cache) == 2 and cache.get(OLD, 2) is None and cache.get(OLD, 1) is not None
    off = ListCache(0)
    off.observe(OLD)
    off.put(OLD, 1, lists(1))
    assert len(off) == 0
