"""The state layer: a transaction's own writes are visible before commit, land atomically, and
the transaction is closed after its commit; the framework's key kinds cannot be taken."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
