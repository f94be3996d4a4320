"""The memory budget's split between RocksDB and the rest of a consuming service."""

from __future__ import annotations

from viewevents.state.store import MAX_WRITE_BUFFERS, memory_split


def test_default_budget_leaves_the_process_almost_half() -> None:
    cache, write_buffer = memory_split(200)
    assert (cache, write_buffer) == (50, 20)
    assert cache + MAX_WRITE_BUFFERS * write_buffer <= 0.55 * 200


def test_explicit_sizes_override_the_budget() -> None:
    assert memory_split(200, cache_mb=128, write_buffer_mb=32) == (128, 32)
    assert memory_split(200, cache_mb=64) == (64, 20)


def test_tiny_budgets_keep_workable_minimums() -> None:
    assert memory_split(10) == (8, 4)
