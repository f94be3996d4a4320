"""A bounded cache of committed values of the recommender's hot keys: user windows and item
records, which nearly every batch reads again.

Only this process writes its store, so a value committed by an earlier batch is still the
stored one: a hit saves a RocksDB point read and nothing else changes. A batch's writes are
staged and enter the cache only in `committed()`, after their write batch landed together with
the offsets; a batch that never commits (a crash) therefore leaves the cache as the store is.
Absent keys are cached too (as None): a new user's window is read before it exists.
When full (by keys or by bytes), the quarter first cached longest ago is dropped at once (a
plain dict keeps insertion order; moving every rewritten key to the end would cost more than the
reads saved). The byte bound matters: a user window grows to 16 bytes per item (3.2 kB at the
default history cap), so a key count alone let the soak's cache grow by ~70 MiB as windows filled.
"""

from __future__ import annotations

from itertools import islice

from viewevents.state.transaction import Transaction

_MISSING = object()
ENTRY_OVERHEAD = 120  # bytes per cached key beyond key and value: two bytes objects, a slot


def entry_bytes(key: bytes, value: bytes | None) -> int:
    """What one cached key costs in memory (about)."""
    return ENTRY_OVERHEAD + len(key) + (0 if value is None else len(value))


class HotRows:
    """Values of up to `capacity` keys and `budget_bytes` bytes (0: no byte bound) as of the
    last commit, read through a transaction."""

    def __init__(self, capacity: int, budget_bytes: int = 0) -> None:
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self.bytes = 0  # sum of entry_bytes over the cached keys
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
            added = 0
            for k, value in zip(missing, read, strict=True):
                found[k] = value
                key = keys[k]
                if key not in values:  # a key asked twice in one call is counted once
                    added += entry_bytes(key, value)
                values[key] = value
            self.bytes += added
            self._trim()
        return found  # type: ignore[return-value]  # every _MISSING was replaced

    def stage(self, keys: list[bytes], values: list[bytes]) -> None:
        """Values written in the current batch: cached once it is committed."""
        self._staged.append((keys, values))

    def committed(self) -> None:
        values = self._values
        get = values.get
        change = 0
        for keys, written in self._staged:
            for key, value in zip(keys, written, strict=True):
                old = get(key, _MISSING)
                if old is _MISSING:
                    change += entry_bytes(key, value)
                else:
                    change += len(value) - (0 if old is None else len(old))  # type: ignore[arg-type]
                values[key] = value
        self.bytes += change
        self._staged = []
        self._trim()

    def _over(self, keys: int, size: int) -> bool:
        return keys > self.capacity or (self.budget_bytes > 0 and size > self.budget_bytes)

    def _trim(self) -> None:
        """Drop the oldest keys until under both bounds, then a quarter of each bound more."""
        values = self._values
        if not self._over(len(values), self.bytes):
            return
        keep_keys = self.capacity - self.capacity // 4
        keep_bytes = self.budget_bytes - self.budget_bytes // 4
        drop, size = 0, self.bytes
        for key, value in values.items():
            if len(values) - drop <= keep_keys and (self.budget_bytes <= 0 or size <= keep_bytes):
                break
            size -= entry_bytes(key, value)
            drop += 1
        self._values = dict(islice(values.items(), drop, None))
        self.bytes = size
