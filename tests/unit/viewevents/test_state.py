"""The state layer: a transaction's own writes are visible before commit, land atomically, and
the transaction is closed after its commit; the framework's key kinds cannot be taken."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from viewevents.state import store as store_module
from viewevents.state.keys import RESERVED, check_service_kinds, prefix_end
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction, TransactionClosed, TransactionStatus


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    opened = StateStore(str(tmp_path / "db"), cache_mb=8, write_buffer_mb=4)
    yield opened
    opened.close()


def test_reads_see_pending_writes_and_nothing_lands_before_commit(store: StateStore) -> None:
    store_txn = Transaction(store)
    store_txn.put(b"a", b"1")
    store_txn.commit()
    txn = Transaction(store)
    txn.put(b"b", b"2")
    txn.put_many([(b"c", b"3"), (b"d", b"4")])
    txn.delete(b"a")
    assert txn.get(b"a") is None and txn.get(b"b") == b"2"
    assert txn.get_many([b"a", b"b", b"c", b"x"]) == [None, b"2", b"3", None]
    assert len(txn) == 4
    assert store.get(b"a") == b"1" and store.get(b"b") is None  # not committed yet
    txn.commit()
    assert txn.status is TransactionStatus.COMMITTED
    assert [store.get(k) for k in (b"a", b"b", b"c", b"d")] == [None, b"2", b"3", b"4"]


def test_a_committed_transaction_refuses_further_use(store: StateStore) -> None:
    txn = Transaction(store)
    txn.put(b"k", b"v")
    txn.commit()
    for use in (
        lambda: txn.put(b"k", b"w"),
        lambda: txn.delete(b"k"),
        lambda: txn.get(b"k"),
        lambda: txn.put_many([(b"k", b"w")]),
        txn.commit,
    ):
        with pytest.raises(TransactionClosed):
            use()
    assert store.get(b"k") == b"v"


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_many_keys_are_read_in_chunks_in_order(
    store: StateStore, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """A multi-get of more keys than a chunk is split; values come back in key order, None for
    absent keys, duplicates included, whatever the chunk edges."""
    monkeypatch.setattr(store_module, "GET_MANY_CHUNK", chunk)
    txn = Transaction(store)
    txn.put_many((b"k%03d" % i, b"v%d" % i) for i in range(0, 40, 3))
    txn.commit()
    keys = [b"k%03d" % i for i in [*range(40), 7, 3, 3, 39]]
    assert store.get_many(keys) == [store.get(key) for key in keys]
    assert sum(value is not None for value in store.get_many(keys)) == 14 + 3
    assert store.get_many([]) == []


def test_range_reads_stop_at_their_upper_bound_after_garbage_collection(
    store: StateStore,
) -> None:
    """`scan` and `scan_keys` give exactly the keys in [start, end), in order, also when the
    read options and the bound are no longer referenced by the caller and memory is reused
    (rocksdict's iterator does not keep them alive: returned bare, it ran past the bound)."""
    txn = Transaction(store)
    txn.put_many([(bytes([a, b]), bytes([b])) for a in range(4) for b in range(50)])
    txn.commit()
    for a in range(3):
        keys = store.scan_keys(bytes([a, 10]), bytes([a, 40]))
        items = store.scan(bytes([a, 10]), bytes([a, 40]))
        gc.collect()
        junk = [bytes(2) for _ in range(10_000)]  # reuse freed memory
        expected = [bytes([a, b]) for b in range(10, 40)]
        assert list(keys) == expected
        assert list(items) == [(key, key[1:]) for key in expected]
        del junk


def test_service_kinds_may_not_clash_with_the_framework() -> None:
    for kind in RESERVED:
        with pytest.raises(ValueError):
            check_service_kinds({b"Z", kind})
    with pytest.raises(ValueError):
        check_service_kinds({b"ab"})
    check_service_kinds({b"T", b"U"})


def test_prefix_end_is_the_first_key_after_the_prefix() -> None:
    assert prefix_end(b"\x00\x01i") == b"\x00\x01j"
    assert prefix_end(b"a\xff\xff") == b"b"
    with pytest.raises(ValueError):
        prefix_end(b"\xff")


def test_rocksdb_reports_its_memory_by_kind(store: StateStore) -> None:
    txn = Transaction(store)
    for i in range(1000):
        txn.put(b"x" + i.to_bytes(4, "big"), b"v" * 100)
    txn.commit()
    memory = store.memory_bytes()
    assert set(memory) == {"block_cache", "memtables", "memtables_all", "table_readers", "pinned"}
    assert memory["memtables"] >= 100_000  # the writes sit in the memtable until a flush


def _persisted_options(db_dir: Path) -> dict[str, str]:
    """The column family options RocksDB wrote to its newest OPTIONS file (what it runs with)."""
    newest = max(db_dir.glob("OPTIONS-*"), key=lambda path: int(path.name.split("-")[1]))
    found: dict[str, str] = {}
    for line in newest.read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep:
            found.setdefault(name, value)
    return found


def test_rocksdb_runs_with_the_sizes_and_compaction_trigger_asked_for(tmp_path: Path) -> None:
    StateStore(str(tmp_path / "db"), cache_mb=8, write_buffer_mb=4).close()
    options = _persisted_options(tmp_path / "db")
    assert options["write_buffer_size"] == str(4 * 1024 * 1024)
    assert options["max_write_buffer_number"] == str(store_module.MAX_WRITE_BUFFERS)
    assert options["level0_file_num_compaction_trigger"] == str(store_module.L0_COMPACTION_TRIGGER)


def _stall_prone(path: Path) -> Rdict:
    """A database that stalls writes whenever any compaction is pending (tiny memtables, a
    1-byte soft limit on pending compaction bytes): write stalls on demand."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(64 * 1024)
    options.set_max_write_buffer_number(2)
    options.set_level_zero_file_num_compaction_trigger(2)
    options.set_soft_pending_compaction_bytes_limit(1)
    options.set_hard_pending_compaction_bytes_limit(1 << 40)
    return Rdict(str(path), options)


def test_a_commit_waits_out_a_write_stall_and_loses_nothing(tmp_path: Path) -> None:
    """RocksDB refuses a write it would throttle (the store asks it to: a throttled write would
    hold the GIL and freeze the event loop); the commit waits and retries with a rebuilt batch
    (a refused write consumes its batch), and every write lands once."""
    store = StateStore(str(tmp_path / "db"), cache_mb=8, write_buffer_mb=4)
    store.db.close()
    store.db = _stall_prone(tmp_path / "stalls")
    stalled, written = 0, 0
    try:
        for batch in range(2_000):
            txn = Transaction(store)
            txn.put_many((f"{batch:05d}-{i:04d}".encode(), bytes(64)) for i in range(500))
            txn.commit()
            written += 500
            stalled += txn.stalled_s > 0
            if stalled >= 3:
                break
        assert stalled >= 3, "the stall-prone database never stalled a write"
        assert sum(1 for _ in store.scan(b"", b"\xff")) == written
    finally:
        store.close()


class _FailingDb:
    def __init__(self, message: str) -> None:
        self.message = message
        self.calls = 0

    def write(self, batch: object, options: object) -> None:
        self.calls += 1
        raise Exception(self.message)  # what rocksdict raises for every failed status


def test_a_failed_write_that_is_not_a_stall_is_raised_at_once(store: StateStore) -> None:
    real = store.db
    store.db = _FailingDb("IO error: No space left on device")  # type: ignore[assignment]
    txn = Transaction(store)
    txn.put(b"k", b"v")
    try:
        with pytest.raises(Exception, match="No space left"):
            txn.commit()
        assert store.db.calls == 1  # type: ignore[attr-defined]
    finally:
        store.db = real
