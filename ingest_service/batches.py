"""Per-partition batches of encoded records: which batch a record goes to, and when one is full.

Pure bookkeeping (no I/O, no waiting): the batch objects come from a factory (the producer's
`create_batch` in service, a fake in tests), and a full batch is handed back to the caller to
ship. Keeping this apart from the flow control and the producer lets each be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class Batch(Protocol):
    """What aiokafka's BatchBuilder offers and this module needs."""

    def append(
        self,
        *,
        timestamp: float | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> object | None: ...

    def record_count(self) -> int: ...


class RecordTooLarge(ValueError):
    """A record that does not fit even in an empty batch (validation should have caught it)."""


class BatchBuilder:
    """Open batches per partition; `add` returns the batch it just filled, if any."""

    def __init__(
        self,
        new_batch: Callable[[], Batch],
        partitioner: Callable[[bytes], int],
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        self._new_batch = new_batch
        self._partitioner = partitioner
        self._headers = list(headers)
        self._open: dict[int, Batch] = {}

    def add(self, key: bytes, value: bytes) -> tuple[int, Batch] | None:
        """Append one record; when its partition's batch was full, that batch is returned (to be
        shipped) and the record starts a new one."""
        return self.add_to(self._partitioner(key), key, value)

    def add_to(self, partition: int, key: bytes, value: bytes) -> tuple[int, Batch] | None:
        """`add` with the partition already known (computed for a whole request at once)."""
        batch = self._open.get(partition)
        if batch is None:
            batch = self._open[partition] = self._new_batch()
        if batch.append(timestamp=None, key=key, value=value, headers=self._headers) is not None:
            return None
        fresh = self._open[partition] = self._new_batch()
        if fresh.append(timestamp=None, key=key, value=value, headers=self._headers) is None:
            raise RecordTooLarge(f"a record of {len(value)} bytes does not fit in a Kafka batch")
        return partition, batch

    def drain(self) -> list[tuple[int, Batch]]:
        """The partly filled batches (non-empty ones), which are no longer open."""
        open_batches, self._open = self._open, {}
        return [(p, b) for p, b in open_batches.items() if b.record_count()]

    def clear(self) -> None:
        self._open.clear()
