"""ListTopMedia's bounded-memory path against brute force, with chunks so small (1 to 7 index
rows) that every ranking is merged across many chunks, and the scan cap.

Same fixtures as tests/test_stats_unit.py: the real processor into a real RocksDB, expected
values from plain Python sets and sums over the same events.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from stats_service import request_parsing
from stats_service.reader import StatsReader
from stats_service.rollups import BucketVersions, RollupCache
from stats_service.servicer import StatsServicer
from stats_service.top_media import RollupRanker
from tests.support.stats_state import Brute, load, partition, random_events
from viewevents.state.store import StateStore
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import view_event_pb2

PARTS = [0, 1, 2]


class _Consumer:
    def position(self) -> view_event_pb2.ConsumerPosition:
        return view_event_pb2.ConsumerPosition(
            partitions=[view_event_pb2.PartitionOffset(partition=p) for p in PARTS]
        )


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Any:
    rng = random.Random(11)
    events = random_events(rng, 2500, media=60, users=40)
    partitioned = partition(events, len(PARTS))
    store = StateStore(str(tmp_path_factory.mktemp("chunks") / "db"))
    load(store, partitioned, rng)
    yield (
        store,
        Brute(partitioned, 0),
        (min(e.seconds for e in events) - 3600, max(e.seconds for e in events) + 3600),
    )
    store.close()


def ranges(span: tuple[int, int], rng: random.Random, count: int) -> list[tuple[int, int]]:
    low, high = span
    out = [(request_parsing.floor_to(low, 60), request_parsing.ceil_to(high, 60))]
    for _ in range(count):
        start = request_parsing.floor_to(rng.randint(low, high), 60)
        out.append((start, start + 60 * rng.choice([1, 61, 600, 1441, 3000, 4 * 1440 + 7])))
    return out


@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
def test_tiny_chunks_give_the_brute_force_figures(state: Any, chunk_rows: int) -> None:
    store, brute, span = state
    reader = StatsReader(store, chunk_rows=chunk_rows)
    for i, (start, end) in enumerate(ranges(span, random.Random(chunk_rows), 8)):
        chunks = list(reader.range_chunks(PARTS, start, end, True))
        expected = brute.top(start, end)
        ids = [m for media, _ in chunks for m in media.tolist()]
        assert ids == sorted(expected) and len(ids) == len(set(ids))  # each once, in order
        assert {
            m: tuple(v) for media, values in chunks for m, v in zip(media.tolist(), values.tolist())
        } == expected
        if i == 0:  # the whole span: its buckets hold many rows each
            assert len(chunks) > 1  # the merge really ran in several chunks


@pytest.mark.parametrize("chunk_rows, rollups", [(3, False), (20_000, False), (20_000, True)])
def test_every_page_of_every_ranking_matches_brute_force(
    state: Any, chunk_rows: int, rollups: bool
) -> None:
    store, brute, span = state
    servicer = StatsServicer(
        StatsReader(store, chunk_rows=chunk_rows),
        _Consumer(),
        request_parsing.Limits(),
        ranker=RollupRanker(store, RollupCache(BucketVersions(), 1 << 24)) if rollups else None,
    )
    for start, end in ranges(span, random.Random(5), 4):
        expected = brute.top(start, end)
        for metric, column in ((1, 0), (2, 1), (3, 2)):
            order = sorted(expected, key=lambda m: (-expected[m][column], m))
            got: list[tuple[int, int, int, int, int]] = []
            offset: int | None = 0
            while offset is not None:
                query = request_parsing.TopQuery(start, end, metric, 7, offset, "00" * 8)
                reply = asyncio.run(servicer._top(query, None))
                got += [
                    (t.rank, t.media_id, t.view_time_seconds, t.starts, t.unique_viewers)
                    for t in reply.media
                ]
                offset = (
                    request_parsing.decode_page_token(reply.next_page_token, "00" * 8)
                    if reply.next_page_token
                    else None
                )
                assert not isinstance(offset, type(request_parsing.violation("", "", "")))
            assert got == [(i + 1, m, *expected[m]) for i, m in enumerate(order)]


def test_at_most_max_concurrent_scans_run_at_once(state: Any) -> None:
    store, _, _ = state
    servicer = StatsServicer(
        StatsReader(store), _Consumer(), request_parsing.Limits(max_concurrent_scans=2)
    )
    lock, release = threading.Lock(), threading.Event()
    running = {"now": 0, "most": 0}

    def blocked_chunks(
        partitions: Sequence[int], start: int, end: int, viewers: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        release.wait(60)
        with lock:
            running["now"] -= 1
        yield np.array([1], np.int64), np.array([[1, 1, 1]], np.int64)

    servicer.reader.range_chunks = blocked_chunks  # type: ignore[method-assign]
    request = pb.ListTopMediaRequest(start_time={"seconds": 0}, end_time={"seconds": 60})

    class Context:
        async def abort(self, code: Any, details: str) -> None:
            raise AssertionError(details)

        def time_remaining(self) -> None:
            return None

    async def scenario() -> None:
        calls = [asyncio.create_task(servicer.ListTopMedia(request, Context())) for _ in range(5)]
        while running["now"] < 2:  # the first two reach their worker threads
            await asyncio.sleep(0.01)
        for _ in range(50):  # the others had every chance to start; they wait
            await asyncio.sleep(0)
        assert running["most"] == 2
        release.set()
        await asyncio.gather(*calls)

    asyncio.run(scenario())
    assert running["most"] == 2 and running["now"] == 0
