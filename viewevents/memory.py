"""How a consuming service splits its memory budget (`VIEWEVENTS_MEMORY_BUDGET_MB`). Pure.

Everything that grows with load gets a fixed share of the budget, so that the process's
resident memory stays under it however long the stream: RocksDB's block cache and memtables,
the Kafka consumer's fetch buffers, the service's own in-memory cache (the recommender's
neighbour lists, its own or those it fanned out for, one kind at a time; the stats service's
ranking rollups), a smaller side cache (the recommender's hot rows) and the
consumer's de-duplication filters (one per owned partition). The rest (41 %) is left to what no
setting bounds: the interpreter and libraries (about 70 MiB), the batch being applied, and
allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
# RocksDB block cache (index and filter blocks included). It was 20 %, which left the rest 62 MiB
# at 200 MiB: less than the process's own fixed part, and both consuming services peaked above
# the budget. Measured with a 20 instead of 40 MiB cache (docs/architecture.md, "Memory"): stats
# catch-up peak 216 to 225 -> 200 to 207 MiB, recommender (200k x 10k) 255 -> 240 MiB, at the
# same consume rates and query latencies (the operating system's page cache keeps the files).
CACHE_SHARE = 0.10
WRITE_BUFFER_SHARE = 0.06  # per RocksDB memtable; at most MAX_WRITE_BUFFERS exist (18 %)
MAX_WRITE_BUFFERS = 3
FETCH_SHARE = 0.08  # what the Kafka consumer's fetching holds (`fetch_sizes`)
SERVICE_CACHE_SHARE = 0.10  # the service's own cache (neighbour lists; stats: rollups)
SIDE_CACHE_SHARE = 0.05  # the recommender's hot rows
DEDUPE_FILTER_SHARE = 0.08  # the consumer's per-partition de-duplication filters, together
MIN_PARTITION_FETCH_BYTES = 1 * MiB  # one partition's fetch may still carry a 1 MiB batch


@dataclass(frozen=True)
class MemoryPlan:
    """What each memory consumer of a service may hold, from one budget."""

    budget_mb: int
    block_cache_mb: int
    write_buffer_mb: int  # per memtable; up to MAX_WRITE_BUFFERS at once
    fetch_max_bytes: int  # a whole fetch response
    max_partition_fetch_bytes: int  # one partition's part of it
    service_cache_mb: int
    side_cache_mb: int = 0
    dedupe_filter_mb: int = 0  # all partitions' filters together

    @property
    def bounded_mb(self) -> float:
        """The sum of the bounded shares (the rest of the budget is for the process itself)."""
        return (
            self.block_cache_mb
            + MAX_WRITE_BUFFERS * self.write_buffer_mb
            + FETCH_HELD_RESPONSES * self.fetch_max_bytes / MiB
            + self.service_cache_mb
            + self.side_cache_mb
            + self.dedupe_filter_mb
        )


FETCH_HELD_RESPONSES = 4  # what fetching holds at once, in fetch responses (`fetch_sizes`)


def fetch_sizes(share_bytes: int) -> tuple[int, int]:
    """(fetch_max_bytes, max_partition_fetch_bytes) such that what aiokafka holds stays within
    `share_bytes`: per owned partition, the undrained records of its last fetch (up to the
    partition size), plus a response being read (its raw frame and the per-partition copies
    decoded from it). With a response of a quarter of the share and a partition of a sixteenth,
    eight partitions buffer half the share and a response in flight twice a quarter. Measured
    in the soak before (response = the share, partition a quarter): a consumer that had fallen
    behind held about 45 MiB of fetched record sets against a 16 MiB share. A partition's part
    is never less than a batch of the largest records ingest writes."""
    response = max(MIN_PARTITION_FETCH_BYTES, share_bytes // FETCH_HELD_RESPONSES)
    return response, max(MIN_PARTITION_FETCH_BYTES, share_bytes // 16)


def plan_memory(
    budget_mb: int, cache_mb: int = 0, write_buffer_mb: int = 0, fetch_mb: int = 0
) -> MemoryPlan:
    """The split of `budget_mb`; explicit sizes (non-zero) override their share."""
    fetch_bytes, partition_bytes = fetch_sizes(
        (fetch_mb or max(4, int(budget_mb * FETCH_SHARE))) * MiB
    )
    return MemoryPlan(
        budget_mb=budget_mb,
        block_cache_mb=cache_mb or max(8, int(budget_mb * CACHE_SHARE)),
        write_buffer_mb=write_buffer_mb or max(4, int(budget_mb * WRITE_BUFFER_SHARE)),
        fetch_max_bytes=fetch_bytes,
        max_partition_fetch_bytes=partition_bytes,
        service_cache_mb=max(1, int(budget_mb * SERVICE_CACHE_SHARE)),
        side_cache_mb=max(1, int(budget_mb * SIDE_CACHE_SHARE)),
        dedupe_filter_mb=max(1, int(budget_mb * DEDUPE_FILTER_SHARE)),
    )
