"""A bounded cache of committed values of the recommender's hot keys: user windows and item
records, which nearly every batch reads again.

Only this process writes its store, so a value committed by an earlier batch is still the
stored one: a hit saves a RocksDB point read and nothing else changes. A batch's writes are
staged and enter the cache only in `committed()`, after their write batch landed together with
the offsets; a batch that never commits (a crash) therefore leaves the cache as the store is.
Absent keys are cached too (as None): a new user's window is read before it exists.
When full, the quarter of keys first cached longest ago is dropped at once (a plain dict keeps
insertion order; moving every rewritten key to the end would cost more than the reads saved).
"""

from __future__ import annotations

from itertools import islice

from viewevents.state.transaction import Transaction

_MISSING = object()


class HotRows:
    """Values of up to `capacity` keys as of the last commit, read through a transaction."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._values: dict[bytes, bytes | None] = {}
        self._staged: list[tuple[list[bytes], list[bytes]]] = []
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._values)

    def get_many(self, txn: Transaction, keys: list[bytes]) -> list[bytes | None]:
        """The values of `keys` as committed (callers read a key before they write it in a
        batch); misses are read from `txn` and remembered."""
        values = self._values
        get = values.get
        found: list[bytes | None | object] = [get(key, _MISSING) for key in keys]
        missing = [k for k, value in enumerate(found) if value is _MISSING]
        self.hits += len(keys) - len(missing)
        if missing:
            self.misses += len(missing)
            read = txn.get_many([keys[k] for k in missing])
            for k, value in zip(missing, read, strict=True):
                found[k] = value
                values[keys[k]] = value
            self._trim()
        return found  # type: ignore[return-value]  # every _MISSING was replaced

    def stage(self, keys: list[bytes], values: list[bytes]) -> None:
        """Values written in the current batch: cached once it is committed."""
        self._staged.append((keys, values))

    def committed(self) -> None:
        update = self._values.update
        for keys, written in self._staged:
            update(zip(keys, written, strict=True))
        self._staged = []
        self._trim()

    def _trim(self) -> None:
        values = self._values
        if len(values) > self.capacity:
            drop = len(values) - self.capacity + self.capacity // 4
            self._values = dict(islice(values.items(), drop, None))
