"""The servicer's rollup warmer: it loads every day's rollups once this instance answers
rankings from them (every partition local and caught up), and not while another instance
owns part of the data (rankings then take the streaming path, which reads no rollups)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from stats_service import request_parsing
from stats_service import servicer as servicer_module
from stats_service.reader import StatsReader
from stats_service.rollups import RollupCache
from stats_service.servicer import StatsServicer
from stats_service.top_media import RollupRanker
from tests.support.positions import caught_up_position
from tests.support.stats_state import loaded_state
from viewevents.state.store import StateStore
from viewevents.v1 import view_event_pb2

PARTITIONS = 3


class _Consumer:
    """Caught up on every partition; `owners` names who owns which (None: all local)."""

    address = "me:1"

    def __init__(self, owners: dict[int, str] | None) -> None:
        self.owners = owners if owners is not None else dict.fromkeys(range(PARTITIONS), "me:1")

    def position(self) -> view_event_pb2.ConsumerPosition:
        return caught_up_position(dict.fromkeys(range(PARTITIONS), 1))

    def answerable(self) -> frozenset[int]:
        return frozenset(p for p, owner in self.owners.items() if owner == self.address)


def _servicer(tmp_path: Path, owners: dict[int, str] | None) -> tuple[StatsServicer, StateStore]:
    state = loaded_state(tmp_path, 4, 2000, PARTITIONS)
    servicer = StatsServicer(
        StatsReader(state.store),
        _Consumer(owners),
        request_parsing.Limits(),
        ranker=RollupRanker(state.store, RollupCache(state.versions, 64 << 20)),
    )
    return servicer, state.store


def test_the_rollups_are_warmed_once_every_partition_is_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer_module, "WARM_POLL_S", 0.01)
    servicer, store = _servicer(tmp_path, None)
    assert servicer.ranker is not None
    cache = servicer.ranker.cache
    days = servicer.ranker.days_with_data(range(PARTITIONS))
    expected = len(days) * PARTITIONS * (1 + 24 + 1)  # day, hours, viewers

    async def run() -> None:
        servicer.start_rollup_warmer()
        deadline = time.monotonic() + 60
        while cache.loads < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        servicer.close()

    asyncio.run(run())
    assert cache.loads == expected
    for p in range(PARTITIONS):
        assert cache.current("bucket", p, 86_400, days[0])
        assert cache.current("viewers", p, 86_400, days[-1])
    store.close()


def test_no_warming_while_another_instance_owns_a_partition(tmp_path: Path) -> None:
    servicer, store = _servicer(tmp_path, {0: "me:1", 1: "other:1", 2: "me:1"})
    assert servicer._every_partition_local() == []  # what the warmer waits for
    servicer.consumer.owners[1] = "me:1"  # the other instance left: all local now
    assert servicer._every_partition_local() == [0, 1, 2]
    store.close()


def test_a_closed_servicer_stops_warming_before_the_next_load(tmp_path: Path) -> None:
    """Shutdown closes RocksDB after the servicer: a warming thread must not go on reading."""
    servicer, store = _servicer(tmp_path, None)
    assert servicer.ranker is not None
    day = servicer.ranker.days_with_data(range(PARTITIONS))[0]
    servicer.close()
    assert not servicer.ranker.warm_day(range(PARTITIONS), day, False, servicer._closed.is_set)
    assert servicer.ranker.cache.loads == 0
    store.close()
