"""Ranked lists gathered from every owner, reused while no partition's offset has moved.

A fanned-out answer is a function of the state it was read from, and that state is named by
the offsets of every partition (state at given offsets is the same on any owner: exactly once,
replayed from the same topic). So an item's complete lists, both metrics at `max_limit`, are
kept under the offsets they were computed at, and served again only to a query whose fresh
position probe (every owner's current offsets) gives exactly those offsets: an answer from the
cache is the answer a recomputation would give. Any new event moves some offset, and the whole
cache is dropped at once (every entry belongs to the one latest state; nothing stale lingers).

Pure bookkeeping, no I/O; the caller (`fanout.Fanout`) probes, gathers and scores. Bounded: at
most `capacity` items (LRU), each about 5 kB with the default `max_limit` of 100.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from recommender_service.settings import cached_item_bytes
from recommender_service.similarity import Metric, Ranked
from viewevents.v1 import view_event_pb2

Offsets = tuple[tuple[int, int], ...]  # ((partition, next offset), ...) ascending partition


def offsets_key(offsets: Mapping[int, int]) -> Offsets:
    return tuple(sorted(offsets.items()))


def position_key(position: view_event_pb2.ConsumerPosition) -> Offsets:
    """The key of a complete answer's position."""
    return offsets_key({p.partition: p.offset for p in position.partitions})


def not_newer(candidate: Offsets, current: Offsets) -> bool:
    """Every partition of `candidate` is at or behind `current` (same partitions)."""
    here = dict(current)
    return dict(candidate).keys() == here.keys() and all(o <= here[p] for p, o in candidate)


@dataclass(frozen=True)
class Lists:
    """One item's top `max_limit` neighbours for both metrics, and the position of the state
    they were computed from (what the answer reports)."""

    lists: dict[Metric, Ranked]
    position: view_event_pb2.ConsumerPosition


class ListCache:
    """Lists of the latest state seen, per item; LRU over at most `capacity` items."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.state: Offsets | None = None
        self._entries: OrderedDict[int, Lists] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def bytes(self) -> int:
        """What the cached lists hold (about), as `QueryEngine.cache_bytes` counts them."""
        overhead = cached_item_bytes(0)
        entries = list(self._entries.values())
        return sum(overhead + sum(r.nbytes for r in e.lists.values()) for e in entries)

    def clear(self) -> None:
        self._entries.clear()

    def holds(self, state: Offsets, media: int) -> bool:
        """Whether lists of `media` for `state` are kept (not counted as a hit or a miss)."""
        return state == self.state and media in self._entries

    def observe(self, state: Offsets) -> None:
        """A fresh probe saw `state`: when it is newer than the cached state (or not comparable,
        e.g. other partitions), every entry is stale and dropped. An older probe that finishes
        late changes nothing (its queries simply find no entry)."""
        if self.state is not None and (state == self.state or not_newer(state, self.state)):
            return
        self.state = state
        self._entries.clear()

    def get(self, state: Offsets, media: int) -> Lists | None:
        found = self._entries.get(media) if state == self.state else None
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(media)
        self.hits += 1
        return found

    def put(self, state: Offsets, media: int, lists: Lists) -> None:
        """Keep `lists`, computed from `state`, if that is still the latest state seen."""
        if self.capacity <= 0 or state != self.state:
            return
        self._entries[media] = lists
        self._entries.move_to_end(media)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
