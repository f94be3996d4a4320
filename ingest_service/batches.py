"""Per-partition batches of encoded records: which batch a record goes to, and when one is full.

Pure bookkeeping (no I/O, no waiting): the batch objects come from a factory (the producer's
`create_batch` in service, a fake in tests), and a full batch is handed back to the caller to
ship. Keeping this apart from the flow control and the producer lets each be tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiokafka.producer.message_accumulator import BatchBuilder as AiokafkaBatchBuilder


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

    def add_run(
        self, partition: int, keys: Sequence[bytes], values: Sequence[bytes]
    ) -> list[Batch]:
        """`add_to` for many records of one partition, in order: the batches they filled (to be
        shipped, oldest first); the last one stays open."""
        full: list[Batch] = []
        batch = self._open.get(partition)
        if batch is None:
            batch = self._open[partition] = self._new_batch()
        done = append_run(batch, keys, values, self._headers)
        while done < len(keys):
            if not batch.record_count():
                raise RecordTooLarge(
                    f"a record of {len(values[done])} bytes does not fit in a Kafka batch"
                )
            full.append(batch)
            batch = self._open[partition] = self._new_batch()
            done += append_run(batch, keys[done:], values[done:], self._headers)
        return full

    def drain(self) -> list[tuple[int, Batch]]:
        """The partly filled batches (non-empty ones), which are no longer open."""
        open_batches, self._open = self._open, {}
        return [(p, b) for p, b in open_batches.items() if b.record_count()]

    def clear(self) -> None:
        self._open.clear()


def append_run(
    batch: Batch,
    keys: Sequence[bytes],
    values: Sequence[bytes],
    headers: Sequence[tuple[str, bytes]],
) -> int:
    """Append records in order until `batch` is full: how many went in.

    On aiokafka's BatchBuilder the records go straight to its record builder (C code), one
    Python call per record instead of three (the wrapper's append and serializer hook did
    nothing here: no serializers, timestamps left to the builder); the wrapper's bookkeeping
    (relative offset, closing a full batch) is done as it would. Anything else, or an aiokafka
    whose BatchBuilder looks different, takes the public `append`.
    """
    builder = _record_builder(batch)
    if builder is None:
        count = 0
        for key, value in zip(keys, values):
            if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:
                return count
            count += 1
        return count
    aiokafka_batch: Any = batch
    first = aiokafka_batch._relative_offset
    offset = first
    append = builder.append
    for key, value in zip(keys, values):
        if append(offset, None, key=key, value=value, headers=headers) is None:
            aiokafka_batch._relative_offset = offset
            aiokafka_batch.close()
            return offset - first
        offset += 1
    aiokafka_batch._relative_offset = offset
    return offset - first


def _record_builder(batch: object) -> Any | None:
    """aiokafka's DefaultRecordBatchBuilder inside `batch`, when it is safe to append to it."""
    if type(batch) is not AiokafkaBatchBuilder:
        return None
    state = vars(batch)
    if (
        state.get("_closed") is not False
        or state.get("_key_serializer") is not None
        or state.get("_value_serializer") is not None
        or not isinstance(state.get("_relative_offset"), int)
    ):
        return None
    return state.get("_builder")
