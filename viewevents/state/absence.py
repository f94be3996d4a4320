"""An in-memory Bloom filter over keys' hashes that proves a key ABSENT, so reads can be skipped.

The consumers read one key per event to de-duplicate by event id, and almost every id is new:
RocksDB answers "not there" from its own bloom filters, but each key still costs a multi-get
slot, a Python bytes object and a result. A key the filter never saw is certainly not stored
(as long as every stored key was added, which is the caller's contract), so only keys the
filter may hold (all the duplicates and about 2 % of new keys at the designed load) are read.
It never says "absent" wrongly: keys deleted from the store stay in it, which only costs reads.

Pure: hashes in, booleans out (numpy); no I/O. Hashes are Python's `hash()` of the key bytes,
stable within one process, which is all an in-memory filter needs.
"""

from __future__ import annotations

import numpy as np

BITS_PER_KEY = 10  # with 3 probes: about 1.7 % false "maybe" at capacity
# Odd 64-bit multipliers (from the golden ratio and two other irrationals): each gives an
# independent-enough bit position from the top bits of hash * multiplier (multiplicative hashing).
_MULTIPLIERS = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64
)


def key_hashes(keys: list[bytes]) -> np.ndarray:
    """The filter's hashes of `keys` (Python's hash of each, computed in C by map)."""
    return np.fromiter(map(hash, keys), np.int64, len(keys)).view(np.uint64)


def bits_log2_for(capacity: int) -> int:
    """log2 of the bits a filter for `capacity` keys has (a power of two, at least 64)."""
    if capacity < 1:
        raise ValueError("capacity must be positive")
    return max(6, int(np.ceil(np.log2(capacity * BITS_PER_KEY))))


def filter_bytes(capacity: int) -> int:
    """The bytes a filter for `capacity` keys holds (known before it is made)."""
    return 1 << (bits_log2_for(capacity) - 3)


class AbsenceFilter:
    """A Bloom filter sized for `capacity` keys (rounded up to a power of two of bits)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.bits_log2 = bits_log2_for(capacity)
        self._words = np.zeros(1 << (self.bits_log2 - 6), np.uint64)
        self._shift = np.uint64(64 - self.bits_log2)
        self.added = 0  # keys added (with repeats): the load that sets the false "maybe" rate

    @property
    def nbytes(self) -> int:
        return int(self._words.nbytes)

    @property
    def full(self) -> bool:
        """More keys were added than it was sized for: its false "maybe" rate climbs."""
        return self.added >= self.capacity

    def _positions(self, hashes: np.ndarray) -> np.ndarray:
        """Bit positions, one row per probe (uint64 products wrap, as multiplicative hashing
        wants)."""
        with np.errstate(over="ignore"):
            return (hashes[None, :] * _MULTIPLIERS[:, None]) >> self._shift

    def add(self, hashes: np.ndarray) -> None:
        if not len(hashes):
            return
        positions = self._positions(hashes).reshape(-1)
        words = (positions >> np.uint64(6)).astype(np.int64)
        bits = np.left_shift(np.uint64(1), positions & np.uint64(63))
        np.bitwise_or.at(self._words, words, bits)
        self.added += len(hashes)

    def may_contain(self, hashes: np.ndarray) -> np.ndarray:
        """False where the key was certainly never added; True where it may have been."""
        if not len(hashes):
            return np.zeros(0, bool)
        positions = self._positions(hashes)
        words = self._words[(positions >> np.uint64(6)).astype(np.int64)]
        set_bits = (words >> (positions & np.uint64(63))) & np.uint64(1)
        return np.asarray(set_bits.all(axis=0), bool)
