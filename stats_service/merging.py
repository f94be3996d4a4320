"""Merging partial answers of several instances (pure): each covers a disjoint set of partitions.

Every stats aggregate is additive across partitions because a user's events all live in one
partition: totals add, distinct viewers add (a user is counted in one partition only), and the
first and last event times are the minimum and maximum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from stats_service.reader import Totals


def merge_totals(parts: Iterable[Totals | None]) -> Totals | None:
    """All-time totals over the union of the partials' partitions (None: no events anywhere)."""
    found = [t for t in parts if t is not None]
    if not found:
        return None
    return Totals(view_time=sum(t.view_time for t in found), starts=sum(t.starts for t in found),
                  stops=sum(t.stops for t in found), ends=sum(t.ends for t in found),
                  uniques=sum(t.uniques for t in found), first=min(t.first for t in found),
                  last=max(t.last for t in found))


def merge_buckets(parts: Iterable[Mapping[int, Sequence[int]]]) -> dict[int, list[int]]:
    """Bucket start -> [view_time, starts, stops, ends, unique viewers], field by field summed."""
    merged: dict[int, list[int]] = {}
    for buckets in parts:
        for start, row in buckets.items():
            have = merged.get(start)
            if have is None:
                merged[start] = list(row)
            else:
                for i, value in enumerate(row):
                    have[i] += value
    return merged
