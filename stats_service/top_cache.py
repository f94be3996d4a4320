"""ListTopMedia pages kept for the applied offsets they were computed at (exact reuse).

A page is a function of the request and of the state it was read from, and the state of the
partitions a single instance answers for is named by their applied offsets (exactly once: the
state at given offsets is always the same). So a page is kept under (its request, the offsets
read before its state was read) and served again only while the offsets are exactly those.
Every applied batch moves an offset: the first lookup or store that sees new offsets drops
every entry at once, so nothing computed from an older state is ever served after a change.

Pure bookkeeping, no I/O. Bounded by bytes (least recently used dropped first); the budget is
carved out of the rollup cache's, so the service's cache share of the memory budget still
covers both.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
Offsets = tuple[tuple[int, int], ...]  # ((partition, next offset), ...) ascending partition

ENTRY_OVERHEAD = 200  # bytes per entry besides the page: key tuple, dict slot, bookkeeping


class PageCache(Generic[V]):
    """Pages of the latest offsets seen, LRU under `budget_bytes` (0: keeps nothing)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, budget_bytes)
        self.offsets: Offsets | None = None
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # pages are computed in worker threads
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _at(self, offsets: Offsets) -> bool:
        """Move to `offsets` (dropping everything) when they differ from the kept ones; False
        when they are older than the kept ones (a slow query: nothing of it is served or kept)."""
        if offsets == self.offsets:
            return True
        if self.offsets is not None and _behind(offsets, self.offsets):
            return False
        self.offsets = offsets
        self._entries.clear()
        self._bytes = 0
        return True

    def get(self, offsets: Offsets, request: Hashable) -> V | None:
        """The page kept for `request` at exactly `offsets`, or None."""
        with self._lock:
            found = self._entries.get(request) if self._at(offsets) else None
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(request)
            self.hits += 1
            return found[0]

    def put(self, offsets: Offsets, request: Hashable, page: V, size: int) -> None:
        """Keep `page` (about `size` bytes), computed from the state at `offsets`, while those
        are the latest offsets seen."""
        cost = size + ENTRY_OVERHEAD
        with self._lock:
            if cost > self.budget or not self._at(offsets):
                return
            old = self._entries.pop(request, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[request] = (page, cost)
            self._bytes += cost
            while self._bytes > self.budget:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped


def page_cache_bytes(rollup_cache_bytes: int, setting_kb: int) -> int:
    """The pages' share of the rollup cache's bytes: a sixteenth by default (`setting_kb` -1),
    else the setting, at most half (the rollups keep the rest; 0: no pages)."""
    if setting_kb < 0:
        return rollup_cache_bytes // 16
    return min(rollup_cache_bytes // 2, setting_kb << 10)


def _behind(candidate: Offsets, current: Offsets) -> bool:
    """Every partition of `candidate` is at or behind `current` (same partitions), not equal."""
    here = dict(current)
    return (
        candidate != current
        and dict(candidate).keys() == here.keys()
        and all(o <= here[p] for p, o in candidate)
    )
