"""The memory budget's split between RocksDB, Kafka fetch buffers, the service's own cache and
the rest of a consuming service."""

from __future__ import annotations

from viewevents.memory import MAX_WRITE_BUFFERS, MiB, fetch_sizes, plan_memory


def test_default_budget_leaves_the_process_two_fifths() -> None:
    plan = plan_memory(200)
    assert (plan.block_cache_mb, plan.write_buffer_mb) == (20, 12)
    assert (plan.fetch_max_bytes, plan.max_partition_fetch_bytes) == (4 * MiB, 1 * MiB)
    assert (plan.service_cache_mb, plan.side_cache_mb, plan.dedupe_filter_mb) == (20, 10, 16)
    assert plan.bounded_mb == 20 + MAX_WRITE_BUFFERS * 12 + 16 + 20 + 10 + 16
    assert plan.bounded_mb <= 0.59 * 200


def test_explicit_sizes_override_the_budget() -> None:
    plan = plan_memory(200, cache_mb=128, write_buffer_mb=32, fetch_mb=64)
    assert (plan.block_cache_mb, plan.write_buffer_mb) == (128, 32)
    assert (plan.fetch_max_bytes, plan.max_partition_fetch_bytes) == (16 * MiB, 4 * MiB)
    assert plan_memory(200, cache_mb=64).write_buffer_mb == 12


def test_tiny_budgets_keep_workable_minimums() -> None:
    plan = plan_memory(10)
    assert (plan.block_cache_mb, plan.write_buffer_mb, plan.service_cache_mb) == (8, 4, 1)
    assert plan.fetch_max_bytes == 1 * MiB and plan.max_partition_fetch_bytes == 1 * MiB


def test_fetching_holds_no_more_than_its_share_up_to_eight_partitions() -> None:
    """aiokafka keeps each owned partition's undrained records (up to the partition size) and
    reads a response (raw frame plus decoded copies) while they wait: all of it within the
    fetch share (16 MiB at 200), where a response as large as the share held about 45 MiB."""
    for share_mb in (16, 64):  # (below 16 MiB the 1 MiB floors bind)
        response, partition = fetch_sizes(share_mb * MiB)
        for partitions in (1, 4, 8):
            held = partitions * partition + 2 * min(response, partitions * partition)
            assert held <= share_mb * MiB, (share_mb, partitions, held)
    assert fetch_sizes(16 * MiB) == (4 * MiB, 1 * MiB)
    assert plan_memory(200).bounded_mb == 20 + MAX_WRITE_BUFFERS * 12 + 16 + 20 + 10 + 16
