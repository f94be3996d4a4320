"""Merging instances' partial answers against the same figures computed over all partitions at
once by brute force: totals, distinct viewers and trend buckets add up exactly because a user
lives in one partition."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable

from stats_service.merging import merge_buckets, merge_totals
from stats_service.reader import Totals


def brute(rows: list[tuple[int, int, int, int]]) -> Totals | None:
    """rows: (partition, user, kind, seconds) of one media item."""
    if not rows:
        return None
    return Totals(
        view_time=30 * sum(r[2] == 2 for r in rows),
        starts=sum(r[2] == 1 for r in rows),
        stops=sum(r[2] == 3 for r in rows),
        ends=sum(r[2] == 4 for r in rows),
        uniques=len({r[1] for r in rows}),
        first=min(r[3] for r in rows),
        last=max(r[3] for r in rows),
    )


def test_partials_over_disjoint_partitions_add_up_to_the_whole() -> None:
    rng = random.Random(4)
    for _ in range(50):
        rows = []
        for _ in range(rng.randrange(0, 60)):
            user = rng.randrange(1, 30)
            rows.append((user % 8, user, rng.randint(1, 4), rng.randrange(0, 10_000)))
        groups: list[Iterable[int]] = rng.choice(
            [[range(8)], [range(0, 3), range(3, 8)], [[p] for p in range(8)]]
        )
        partials = [brute([r for r in rows if r[0] in set(g)]) for g in groups]
        assert merge_totals(partials) == brute(rows)


def test_trend_buckets_add_field_by_field() -> None:
    rng = random.Random(8)
    per_partition = [
        {rng.randrange(0, 5) * 60: [rng.randrange(9) for _ in range(5)] for _ in range(4)}
        for _ in range(3)
    ]
    expected: dict[int, list[int]] = defaultdict(lambda: [0] * 5)
    for buckets in per_partition:
        for start, row in buckets.items():
            expected[start] = [a + b for a, b in zip(expected[start], row)]
    assert merge_buckets(per_partition) == dict(expected)
    assert merge_buckets([]) == {}
