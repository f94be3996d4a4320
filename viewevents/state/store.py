"""The RocksDB store of a consuming service: bounded memory, atomic commits of state plus offsets.

Reads may come from any thread (gRPC handlers); writes come only from `Transaction.commit`.
The key layout shared by every service is in `viewevents.state.keys`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from rocksdict import (
    BlockBasedIndexType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from viewevents.memory import MAX_WRITE_BUFFERS
from viewevents.state.codecs import BIG_I64
from viewevents.state.keys import offset_key, prefix_end, watermark_key

log = logging.getLogger(__name__)

_STALL_STATUS = "Write stall"  # RocksDB's Status::Incomplete text for a write it would delay
_STALL_POLL_S = (0.001, 0.05)  # first and longest wait between tries during a write stall
_STALL_LOG_S = 1.0  # a commit that waited this long on a stall is logged
_STALL_RETRY_S = 1.0  # longest wait between two tries while RocksDB still says it throttles
_STALL_NAG_S = 30.0  # a stall still going on is logged again this often


# RocksDB compacts level 0 into level 1 once this many L0 files (flushed memtables) exist;
# its default is 4. Event ids and hour rows land all over the key space, so every such
# compaction rewrites most of level 1: waiting for 8 files halves how often that happens, for
# reads that check up to 8 L0 files' filters (pinned in the cache) instead of 4. Writes are
# slowed only at 20 files, stopped at 36 (RocksDB's defaults), still far off. Measured in the
# stats bench (2M events; two pairs, alternating 4 and 8): RocksDB threads 5.19, 5.05 -> 3.94,
# 3.59 CPU s; 69.9k, 68.9k -> 77.8k, 75.1k events/s; queries unchanged within the noise. 16
# deferred more compaction (1.71 s) but applied no faster (70.5k events/s). The recommender
# bench, two pairs: events per CPU second 87k, 92k -> 94k, 97k (20k x 2k) and 54k, 56k -> 57k,
# 62k (200k x 10k), events/s within the noise (75k, 79k -> 69k, 77k at 200k x 10k).
L0_COMPACTION_TRIGGER = 8


def bounded_options(cache_mb: int, write_buffer_mb: int) -> Options:
    """Options whose memory does not grow with the data: a fixed block cache (index and filter
    blocks charged to it) and at most three write buffers."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(write_buffer_mb * 1024 * 1024)
    options.set_max_write_buffer_number(MAX_WRITE_BUFFERS)
    options.set_max_open_files(512)
    options.increase_parallelism(2)
    options.set_compression_type(DBCompressionType.lz4())
    options.set_level_zero_file_num_compaction_trigger(L0_COMPACTION_TRIGGER)
    # Most point reads ask for keys that do not exist yet (new event ids, new viewers): a bloom
    # filter on the memtables answers them without walking the skiplists.
    options.set_memtable_prefix_bloom_ratio(0.05)
    options.set_memtable_whole_key_filtering(True)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(cache_mb * 1024 * 1024))
    # Partitioned index and bloom filters: charged to the cache in small blocks, so a large SST's
    # filter never has to fit in one cache shard (a monolithic multi-MB filter block does not,
    # and was then re-read on every lookup: 20 us instead of 1 to 3 us per point lookup).
    table.set_bloom_filter(10, False)
    table.set_index_type(BlockBasedIndexType.two_level_index_search())
    table.set_partition_filters(True)
    table.set_metadata_block_size(4096)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_top_level_index_and_filter(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_format_version(5)
    options.set_block_based_table_factory(table)
    return options


GET_MANY_CHUNK = 1024  # keys per RocksDB multi-get (see StateStore.get_many)


class StateStore:
    """One RocksDB database of raw byte keys and values.

    Reads may come from any thread (gRPC handlers); writes come only from `commit`.
    """

    def __init__(self, path: str, cache_mb: int = 50, write_buffer_mb: int = 20) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.db = Rdict(path, bounded_options(cache_mb, write_buffer_mb))
        self._write_options = WriteOptions()  # WAL on, no fsync: survives kill -9 (not power loss)
        # rocksdict holds the GIL through a write, so a write RocksDB throttles (a write stall:
        # compaction behind the writes) would freeze the whole process for as long, the event
        # loop with it: gRPC answers stop and Kafka heartbeats miss, and the group evicts the
        # instance (seen on a 10M-event stream). Such a write fails at once instead, and
        # `write` waits with the GIL released.
        self._write_options.no_slowdown = True
        self._commit_lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Values of `keys` (None where absent), read GET_MANY_CHUNK keys per RocksDB multi-get.

        A multi-get allocates per-key bookkeeping (key contexts, pinnable slices, statuses) of
        over a hundred bytes a key. For a batch's 20,000 keys that is several MiB, which glibc
        maps fresh for each call and unmaps after (the mmap threshold): perf counted the page
        faults of that bookkeeping as a quarter of the stats apply's. Chunks of 1,024 keys stay
        under the threshold and reuse heap memory."""
        if len(keys) <= GET_MANY_CHUNK:
            # rocksdict's stubs do not know that a list of keys gives a list of values.
            return cast(list[bytes | None], self.db.get(keys)) if keys else []  # type: ignore[arg-type]
        values: list[bytes | None] = []
        for start in range(0, len(keys), GET_MANY_CHUNK):
            values += self.db.get(keys[start : start + GET_MANY_CHUNK])  # type: ignore[arg-type]
        return values

    def scan(self, start: bytes, end: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Items with start <= key < end, in key order. A generator, so that the read options
        live as long as the iteration: rocksdict's iterator does not keep them, and returned
        bare it ran past its upper bound once they were freed."""
        read = ReadOptions()
        read.set_iterate_upper_bound(end)
        yield from self.db.items(from_key=start, read_opt=read)

    def scan_keys(self, start: bytes, end: bytes) -> Iterator[bytes]:
        """Keys with start <= key < end, in key order: no Python object per value (about a
        third cheaper per row than `scan` where the values are not needed)."""
        read = ReadOptions()
        read.set_iterate_upper_bound(end)
        yield from self.db.keys(from_key=start, read_opt=read)

    def scan_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self.scan(prefix, prefix_end(prefix))

    def write(self, build: Callable[[], WriteBatch]) -> float:
        """Apply the write batch `build` makes, atomically (state and offsets land together or not
        at all); only `Transaction.commit` calls this. During a write stall it retries until
        compaction lets the write through, sleeping (GIL released) between tries, each with a
        new batch (a failed write consumes its batch). Returns the seconds waited on stalls."""
        with self._commit_lock:
            began = time.monotonic()
            stalled = False
            while True:
                try:
                    self.db.write(build(), self._write_options)
                    break
                except Exception as error:  # rocksdict raises a bare Exception for every status
                    if _STALL_STATUS not in str(error):
                        raise
                stalled = True
                self._wait_out_stall(began)
        waited = time.monotonic() - began if stalled else 0.0
        if waited >= _STALL_LOG_S:
            log.warning(
                "a commit waited %.1f s on a RocksDB write stall (compaction behind the writes)",
                waited,
            )
        return waited

    def _wait_out_stall(self, began: float) -> None:
        """Sleep (GIL released) until RocksDB neither stops nor delays writes, or for at most
        _STALL_RETRY_S: rebuilding the batch for a write bound to be refused would hold the GIL
        for nothing. Says so every _STALL_NAG_S while a stall lasts."""
        pause, tried = _STALL_POLL_S[0], time.monotonic()
        while True:
            time.sleep(pause)
            now = time.monotonic()
            if (now - began) // _STALL_NAG_S > (now - pause - began) // _STALL_NAG_S:
                log.warning("a commit has waited %.0f s on a RocksDB write stall", now - began)
            if not self._throttled() or now - tried >= _STALL_RETRY_S:
                return
            pause = min(2 * pause, _STALL_POLL_S[1])

    def _throttled(self) -> bool:
        """Whether RocksDB stops or delays writes now (two cheap properties)."""
        return bool(
            self.db.property_int_value("rocksdb.is-write-stopped")
            or self.db.property_int_value("rocksdb.actual-delayed-write-rate")
        )

    def size_bytes(self) -> int:
        return int(self.db.property_int_value("rocksdb.total-sst-files-size") or 0) + int(
            self.db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        )

    def memory_bytes(self) -> dict[str, int]:
        """What RocksDB itself holds in memory, by kind (its own accounting)."""
        names = {
            "block_cache": "rocksdb.block-cache-usage",
            "memtables": "rocksdb.cur-size-all-mem-tables",
            # Flushed memtables still held by live iterators or snapshots' super versions count
            # here and not above: a read that never releases its iterator grows this one.
            "memtables_all": "rocksdb.size-all-mem-tables",
            "table_readers": "rocksdb.estimate-table-readers-mem",
            "pinned": "rocksdb.block-cache-pinned-usage",
        }
        return {k: int(self.db.property_int_value(v) or 0) for k, v in names.items()}

    # --- consumer bookkeeping -----------------------------------------------------------------

    def stored_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """Next offset to read per partition, for those that have one."""
        parts = list(partitions)
        keys = [offset_key(p, topic) for p in parts]
        return {
            p: BIG_I64.unpack(v)[0] for p, v in zip(parts, self.get_many(keys)) if v is not None
        }

    def watermark(self, partitions: Iterable[int]) -> int | None:
        """Highest event time (Unix seconds) applied over the given partitions."""
        values = self.get_many([watermark_key(p) for p in partitions])
        seen = [BIG_I64.unpack(v)[0] for v in values if v is not None]
        return max(seen) if seen else None
