"""Merging partial answers of several instances (pure): each covers a disjoint set of partitions.

Every stats aggregate is additive across partitions because a user's events all live in one
partition: totals add, distinct viewers add (a user is counted in one partition only), and the
first and last event times are the minimum and maximum.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

import numpy as np

from stats_service.reader import Totals

# A run of per-media partial sums: ascending distinct media ids, and one int64 row per item
# (view_time, starts, unique viewers); no id of a stream's chunk appears in its other chunks.
Chunk = tuple[np.ndarray, np.ndarray]


def merge_totals(parts: Iterable[Totals | None]) -> Totals | None:
    """All-time totals over the union of the partials' partitions (None: no events anywhere)."""
    found = [t for t in parts if t is not None]
    if not found:
        return None
    return Totals(
        view_time=sum(t.view_time for t in found),
        starts=sum(t.starts for t in found),
        stops=sum(t.stops for t in found),
        ends=sum(t.ends for t in found),
        uniques=sum(t.uniques for t in found),
        first=min(t.first for t in found),
        last=max(t.last for t in found),
    )


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


async def merge_by_media(streams: Sequence[AsyncIterator[Chunk]]) -> AsyncIterator[Chunk]:
    """The streams' partial sums merged by media id, in ascending chunks (rows summed: every
    stream covers other partitions). Holds one chunk per stream: each step emits every item
    up to the smallest last id of the streams' current chunks, which no stream can still
    send, and reads on only the streams whose chunk was used up. A failing stream fails the
    merge (after the other reads of the step finished: nothing is left running)."""
    pending: list[Chunk | None] = [None] * len(streams)
    live = list(range(len(streams)))
    while True:
        need = [i for i in live if pending[i] is None]
        got = await asyncio.gather(*(anext(streams[i], None) for i in need), return_exceptions=True)
        for i, chunk in zip(need, got):
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk is None:
                live.remove(i)
            elif len(chunk[0]):
                pending[i] = chunk
        if not live:
            return
        if any(pending[i] is None for i in live):  # an empty chunk: read that stream on
            continue
        bound = min(int(pending[i][0][-1]) for i in live)  # type: ignore[index]
        media_parts, value_parts = [], []
        for i in live:
            media, values = pending[i]  # type: ignore[misc]
            cut = int(np.searchsorted(media, bound, side="right"))
            media_parts.append(media[:cut])
            value_parts.append(values[:cut])
            pending[i] = (media[cut:], values[cut:]) if cut < len(media) else None
        media, index = np.unique(np.concatenate(media_parts), return_inverse=True)
        rows = np.concatenate(value_parts).astype(np.int64)
        summed = np.zeros((len(media), rows.shape[1]), np.int64)
        np.add.at(summed, index.reshape(-1), rows)
        yield media.astype(np.int64), summed
