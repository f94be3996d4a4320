"""The writes of one consumed batch: readable before they are committed, committed once.

Processors read through the transaction (`get` sees their own pending writes first), so several
events touching one key within a batch combine in memory and reach RocksDB as one write; the
consumer commits the state and the partitions' next offsets in the same RocksDB write batch.
The write cache is private and guarded by a status, so a transaction cannot be written to after
its commit (which would silently lose the write) or committed twice.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping

from rocksdict import WriteBatch

from viewevents.state.store import StateStore


class TransactionStatus(enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"


class TransactionClosed(RuntimeError):
    """A write, read or commit on a transaction that was already committed."""


class Transaction:
    """Pending puts and deletes over a `StateStore`; `commit` applies them atomically."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._pending: dict[bytes, bytes | None] = {}  # None = delete
        self._deletes = 0  # delete() calls: when 0, commit hands every pending put over in C
        self._status = TransactionStatus.OPEN
        self.bytes_written = 0  # the RocksDB write batch's size, once committed
        self.stalled_s = 0.0  # how long the commit waited on RocksDB write stalls

    @property
    def status(self) -> TransactionStatus:
        return self._status

    @property
    def store(self) -> StateStore:
        return self._store

    def __len__(self) -> int:
        """Keys written (put or deleted) so far."""
        return len(self._pending)

    def _check_open(self) -> None:
        if self._status is not TransactionStatus.OPEN:
            raise TransactionClosed(f"transaction is {self._status.value}")

    # --- reads (own writes first) --------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        self._check_open()
        if key in self._pending:
            return self._pending[key]
        return self._store.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        self._check_open()
        pending = self._pending
        if pending.keys().isdisjoint(keys):
            # The usual case (each kind is read once per batch, before it is written): no Python
            # loop over the keys, which are one per event for the de-duplication ids.
            return self._store.get_many(keys)
        missing = [k for k in keys if k not in pending]
        found = dict(zip(missing, self._store.get_many(missing)))
        return [pending[k] if k in pending else found[k] for k in keys]

    # --- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        self._check_open()
        self._pending[key] = value

    def put_many(self, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]) -> None:
        """Many puts in one call: the consumers' hot paths write thousands of keys per batch."""
        self._check_open()
        self._pending.update(items)

    def delete(self, key: bytes) -> None:
        self._check_open()
        self._pending[key] = None
        self._deletes += 1

    def commit(self) -> None:
        """Apply every pending write in one RocksDB write batch; the transaction is then closed."""
        self._check_open()
        self.stalled_s = self._store.write(self._batch)
        self._pending = {}
        self._status = TransactionStatus.COMMITTED

    def _batch(self) -> WriteBatch:
        """A RocksDB write batch of every pending write (made again if a write stall refused the
        last one)."""
        batch = WriteBatch(raw_mode=True)
        pending = self._pending
        if self._deletes:
            for key, value in pending.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
        else:
            # One put per key, called from C (map), not from a Python loop: a batch holds about
            # two keys per event.
            deque(map(batch.put, pending.keys(), pending.values()), maxlen=0)
        self.bytes_written = batch.size_in_bytes()  # the write consumes the batch
        return batch
