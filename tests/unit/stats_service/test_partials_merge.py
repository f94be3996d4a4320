"""The streaming merge of owners' per-media partial sums (ListTopMedia across instances),
against brute force: random partials split into tiny chunks (some empty), merged by media id,
summed, and ranked by the running top-(offset + limit)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import numpy as np
import pytest

from stats_service import request_parsing
from stats_service.merging import Chunk, merge_by_media
from viewevents import scatter

Partials = dict[int, tuple[int, int, int]]


def random_partials(rng: random.Random, owners: int) -> list[Partials]:
    universe = rng.sample(range(1, 400), rng.randint(0, 120))
    return [
        {
            m: (rng.randint(0, 50), rng.randint(0, 5), rng.randint(0, 4))
            for m in universe
            if rng.random() < 0.5
        }
        for _ in range(owners)
    ]


async def stream(
    partials: Partials, rng: random.Random, fail_after: int | None = None
) -> AsyncIterator[Chunk]:
    """`partials` in ascending chunks of 0 to 3 media; raises after `fail_after` chunks."""
    ids = sorted(partials)
    at = sent = 0
    while at < len(ids):
        if fail_after is not None and sent == fail_after:
            raise ConnectionError("owner went away")
        size = rng.randint(0, 3)
        part = ids[at : at + size]
        at += size
        sent += 1
        await asyncio.sleep(0)
        yield (
            np.array(part, np.int64),
            np.array([partials[m] for m in part], np.int64).reshape(len(part), 3),
        )


def brute_sum(parts: list[Partials]) -> Partials:
    out: dict[int, list[int]] = {}
    for partials in parts:
        for m, row in partials.items():
            have = out.setdefault(m, [0, 0, 0])
            for i in range(3):
                have[i] += row[i]
    return {m: (v[0], v[1], v[2]) for m, v in out.items()}


async def merged(parts: list[Partials], rng: random.Random) -> list[Chunk]:
    return [c async for c in merge_by_media([stream(p, rng) for p in parts])]


@pytest.mark.parametrize("seed", range(40))
def test_merged_sums_and_rankings_equal_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    parts = random_partials(rng, rng.randint(1, 4))
    expected = brute_sum(parts)
    chunks = asyncio.run(merged(parts, rng))
    ids = [m for media, _ in chunks for m in media.tolist()]
    assert ids == sorted(expected)  # every item once, ascending
    assert {
        m: tuple(v) for media, values in chunks for m, v in zip(media.tolist(), values.tolist())
    } == expected
    for metric, column in zip(request_parsing.METRICS, range(3)):
        order = sorted(expected, key=lambda m: (-expected[m][column], m))
        offset, limit = rng.randint(0, 10), rng.randint(1, 8)
        best = request_parsing.TopKeeper(metric, offset + limit)
        for media, values in chunks:
            best.add(media, values)
        chosen, rows, following = best.page(offset, limit)
        assert chosen == order[offset : offset + limit]
        assert rows == {m: expected[m] for m in chosen}
        assert following == (offset + limit if offset + limit < len(expected) else None)


def test_one_failing_owner_fails_the_merge_and_names_its_partitions() -> None:
    rng = random.Random(3)
    parts = [{m: (1, 1, 1) for m in range(1, 60)} for _ in range(3)]

    async def run() -> None:
        streams = [
            scatter.guard_stream("a:1", [0, 1], stream(parts[0], rng)),
            scatter.guard_stream("b:1", [2], stream(parts[1], rng, fail_after=4)),
            scatter.guard_stream("c:1", [3], stream(parts[2], rng)),
        ]
        async for _ in merge_by_media(streams):
            pass

    with pytest.raises(scatter.Incomplete) as raised:
        asyncio.run(run())
    assert set(raised.value.missing) == {2}
    assert "b:1" in str(raised.value) and "owner went away" in str(raised.value)


def test_a_silent_owner_is_missing_after_the_idle_timeout() -> None:
    async def silent() -> AsyncIterator[Chunk]:
        await asyncio.Event().wait()
        yield np.zeros(0, np.int64), np.zeros((0, 3), np.int64)

    async def run() -> None:
        async for _ in merge_by_media([scatter.guard_stream("d:1", [5], silent(), 0.05)]):
            pass

    with pytest.raises(scatter.Incomplete) as raised:
        asyncio.run(run())
    assert set(raised.value.missing) == {5} and "did not answer" in str(raised.value)
