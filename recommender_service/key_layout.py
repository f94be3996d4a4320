"""Key layout and value codecs of the recommender's RocksDB state, and read helpers.

Every key starts with the 2-byte partition prefix (viewevents.state.keys), then one kind byte.
The framework's kinds (offsets, watermark, de-duplication) are checked not to clash; the
recommender uses:

  c                          -> users seen in this partition: N_p (int64)
  u + user(8)                -> the user's window: flags(1) + media[k] (int64) + w[k] (int64),
                                most recent first, at most `history_cap` items, w > 0 only
  v + user(8) + media(8)     -> w (int64) of an item that fell out of the user's window
  m + media(8)               -> item: S, Q, n (int64 each); row chunks: deltas, base entries,
                                delta entries (int32 each)
  r + media(8) + seq(4)      -> neighbour row chunk of the item: packed ROW entries; seq 0 is the
                                compacted base, 1..k are per-batch deltas not yet compacted

Ids are big-endian unsigned so keys sort numerically. View time is stored in heartbeats
(waypoints): S, Q, D are exact integers whatever `heartbeat_seconds` is, and both similarity
metrics are scale-free, so seconds are only applied when a number is shown to a person.
Every statistic is a sum over users, and users live in one partition (the Kafka key is the user
id), so per-partition values add up exactly; queries sum over partitions.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from viewevents.state.codecs import BIG_I64, BIG_U32, BIG_U64, LITTLE_I64
from viewevents.state.keys import (
    check_service_kinds,
    offset_key,
    partition_prefix,
    prefix_end,
    watermark_key,
)
from viewevents.state.store import StateStore

ITEM = struct.Struct("<qqqiii")

KIND_COUNTS = b"c"
KIND_USER = b"u"
KIND_EVICTED = b"v"
KIND_ITEM = b"m"
KIND_ROW = b"r"
check_service_kinds({KIND_COUNTS, KIND_USER, KIND_EVICTED, KIND_ITEM, KIND_ROW})

FLAG_HAS_EVICTED = 1

# One neighbour entry: neighbour media id, dot product D (heartbeats^2), co-viewers c.
ROW = np.dtype([("j", "<i8"), ("d", "<i8"), ("c", "<i4")])

# An item record as numpy reads it in bulk: the same 36 bytes as ITEM.
ITEMS = np.dtype(
    [
        ("s", "<i8"),
        ("q", "<i8"),
        ("n", "<i8"),
        ("deltas", "<i4"),
        ("base_entries", "<i4"),
        ("delta_entries", "<i4"),
    ]
)
assert ITEMS.itemsize == ITEM.size


def counts_key(partition: int) -> bytes:
    return partition_prefix(partition) + KIND_COUNTS


def user_key(partition: int, user: int) -> bytes:
    return partition_prefix(partition) + KIND_USER + BIG_U64.pack(user)


def evicted_key(partition: int, user: int, media: int) -> bytes:
    return partition_prefix(partition) + KIND_EVICTED + BIG_U64.pack(user) + BIG_U64.pack(media)


def evicted_prefix(partition: int, user: int) -> bytes:
    return partition_prefix(partition) + KIND_EVICTED + BIG_U64.pack(user)


def item_key(partition: int, media: int) -> bytes:
    return partition_prefix(partition) + KIND_ITEM + BIG_U64.pack(media)


def row_prefix(partition: int, media: int) -> bytes:
    return partition_prefix(partition) + KIND_ROW + BIG_U64.pack(media)


def row_key(partition: int, media: int, seq: int) -> bytes:
    return row_prefix(partition, media) + BIG_U32.pack(seq)


@dataclass
class ItemRecord:
    """Per-partition statistics of one item (mutable while a batch is applied)."""

    s: int = 0
    q: int = 0
    n: int = 0
    deltas: int = 0
    base_entries: int = 0
    delta_entries: int = 0

    def encode(self) -> bytes:
        return ITEM.pack(self.s, self.q, self.n, self.deltas, self.base_entries, self.delta_entries)

    @classmethod
    def decode(cls, value: bytes) -> ItemRecord:
        return cls(*ITEM.unpack(value))


def encode_window(media: list[int], w: list[int], has_evicted: bool) -> bytes:
    k = len(media)
    return bytes([FLAG_HAS_EVICTED if has_evicted else 0]) + struct.pack(f"<{2 * k}q", *media, *w)


def decode_window(value: bytes) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(media most recent first, w, has evicted items); an empty value is a user with no views."""
    if not value:
        return (), (), False
    k = (len(value) - 1) // 16
    numbers = struct.unpack_from(f"<{2 * k}q", value, 1)
    return numbers[:k], numbers[k:], bool(value[0] & FLAG_HAS_EVICTED)


@dataclass
class StoredWindows:
    """Several users' stored windows laid end to end (numpy columns), as `decode_windows` reads
    them: one user's window is media[starts[k]:starts[k] + lengths[k]] (most recent first)."""

    known: np.ndarray
    """Per user: a window is stored (False: a user never seen)."""
    has_evicted: np.ndarray
    """Per user: items fell out of the window before."""
    lengths: np.ndarray
    media: np.ndarray
    w: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths


def decode_windows(values: list[bytes | None]) -> StoredWindows:
    """`decode_window` of many values at once (None: no stored window), without a Python
    object per item: the values are joined and read as one int64 array."""
    users = len(values)
    sizes = np.fromiter((-1 if v is None else len(v) for v in values), np.int64, users)
    known = sizes >= 0
    sizes = np.maximum(sizes, 0)
    lengths = np.maximum(sizes - 1, 0) // 16
    data = np.frombuffer(b"".join(v for v in values if v), dtype=np.uint8)
    stored = sizes > 0
    flags = np.zeros(users, dtype=bool)
    if len(data):
        starts = np.cumsum(sizes[stored]) - sizes[stored]
        flags[stored] = (data[starts] & FLAG_HAS_EVICTED) != 0
        payload = np.ones(len(data), dtype=bool)
        payload[starts] = False
        numbers = data[payload].view("<i8")
    else:
        numbers = np.zeros(0, dtype=np.int64)
    # Each window is media[k] then w[k]: split the numbers by their position in their window.
    owner = np.repeat(np.arange(users), 2 * lengths)
    offset = np.arange(len(numbers)) - np.repeat(np.cumsum(2 * lengths) - 2 * lengths, 2 * lengths)
    is_media = offset < lengths[owner]
    return StoredWindows(
        known,
        flags,
        lengths,
        numbers[is_media].astype(np.int64),
        numbers[~is_media].astype(np.int64),
    )


def encode_windows(
    has_evicted: np.ndarray, lengths: np.ndarray, media: np.ndarray, w: np.ndarray
) -> list[bytes]:
    """`encode_window` of many windows laid end to end (media and w flat, `lengths` each): one
    byte buffer is built with numpy and cut into the values."""
    count = len(lengths)
    if count == 0:
        return []
    sizes = 1 + 16 * lengths
    ends = np.cumsum(sizes)
    starts = ends - sizes
    out = np.zeros(int(ends[-1]), dtype=np.uint8)
    out[starts] = np.where(has_evicted, FLAG_HAS_EVICTED, 0).astype(np.uint8)
    # Byte positions of the k-th int64 of each window: media then w.
    owner = np.repeat(np.arange(count), lengths)
    rank = np.arange(len(media)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    media_at = starts[owner] + 1 + 8 * rank
    w_at = media_at + 8 * lengths[owner]
    lanes = np.arange(8)
    out[(media_at[:, None] + lanes).ravel()] = media.astype("<i8").view(np.uint8)
    out[(w_at[:, None] + lanes).ravel()] = w.astype("<i8").view(np.uint8)
    data = out.tobytes()
    return [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _keys(prefix: bytes, *columns: np.ndarray, dtypes: tuple[str, ...] = ()) -> list[bytes]:
    """prefix + each column big-endian (uint64 unless `dtypes` says), for many keys at once."""
    count = len(columns[0]) if columns else 0
    types = [np.dtype(t) for t in dtypes] + [np.dtype(">u8")] * (len(columns) - len(dtypes))
    width = len(prefix) + sum(t.itemsize for t in types)
    out = np.empty((count, width), dtype=np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    at = len(prefix)
    for column, kind in zip(columns, types, strict=True):
        size = kind.itemsize
        out[:, at : at + size] = np.asarray(column, dtype=kind).view(np.uint8).reshape(-1, size)
        at += size
    data = out.tobytes()
    return [data[i : i + width] for i in range(0, count * width, width)]


def user_keys(partition: int, users: np.ndarray) -> list[bytes]:
    return _keys(partition_prefix(partition) + KIND_USER, users)


def evicted_keys(partition: int, users: np.ndarray, media: np.ndarray) -> list[bytes]:
    return _keys(partition_prefix(partition) + KIND_EVICTED, users, media)


def row_keys(partition: int, media: np.ndarray, seqs: np.ndarray) -> list[bytes]:
    return _keys(partition_prefix(partition) + KIND_ROW, media, seqs, dtypes=(">u8", ">u4"))


def item_keys(partition: int, media: np.ndarray) -> list[bytes]:
    return _keys(partition_prefix(partition) + KIND_ITEM, media)


def decode_items(values: list[bytes | None]) -> np.ndarray:
    """Item records (ITEMS) of many values at once; a missing value is an item never seen."""
    empty = bytes(ITEMS.itemsize)
    return np.frombuffer(b"".join(empty if v is None else v for v in values), dtype=ITEMS).copy()


def encode_items(records: np.ndarray) -> list[bytes]:
    data = np.ascontiguousarray(records, dtype=ITEMS).tobytes()
    size = ITEMS.itemsize
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode_counts(value: bytes | None) -> int:
    return LITTLE_I64.unpack(value)[0] if value else 0


def encode_counts(users: int) -> bytes:
    return LITTLE_I64.pack(users)


def encode_many_counts(values: np.ndarray) -> list[bytes]:
    """`encode_counts` of many int64 values at once."""
    data = np.asarray(values, dtype="<i8").tobytes()
    return [data[i : i + 8] for i in range(0, len(data), 8)]


def decode_row(chunks: Iterable[bytes]) -> np.ndarray:
    """Concatenated ROW entries of several chunks (entries of one neighbour may repeat)."""
    data = b"".join(chunks)
    return np.frombuffer(data, dtype=ROW)


def aggregate_row(entries: np.ndarray) -> np.ndarray:
    """Sum entries per neighbour, sorted by neighbour id, in exact int64 arithmetic."""
    if len(entries) == 0:
        return np.zeros(0, dtype=ROW)
    order = np.argsort(entries["j"], kind="stable")
    js = entries["j"][order]
    starts = np.flatnonzero(np.concatenate(([True], js[1:] != js[:-1])))
    out = np.empty(len(starts), dtype=ROW)
    out["j"] = js[starts]
    out["d"] = np.add.reduceat(entries["d"][order], starts)
    out["c"] = np.add.reduceat(entries["c"][order].astype(np.int64), starts)
    return out


# --- reading ----------------------------------------------------------------------------------


def scan(source: Any, prefix: bytes, fill_cache: bool = True) -> Iterator[tuple[bytes, bytes]]:
    """Items under `prefix` of a Rdict or a rocksdict Snapshot, in key order. One-off reads of
    whole rows pass fill_cache=False so they do not evict the hot point-lookup blocks."""
    from rocksdict import ReadOptions

    read = ReadOptions()
    read.set_iterate_upper_bound(prefix_end(prefix))
    if not fill_cache:
        read.fill_cache(False)  # type: ignore[call-arg]  # the stub omits the flag
    for key, value in source.items(from_key=prefix, read_opt=read):
        if not key.startswith(prefix):  # upper bound makes this unreachable; kept as a guard
            break
        yield key, value


def scan_values(
    source: Any, prefix: bytes, fill_cache: bool = True, end: bytes | None = None
) -> list[bytes]:
    """The values under `prefix` (or from `prefix` up to `end`) of a Rdict or a Snapshot, in
    key order: `scan` without making a key object per item or checking it in Python (the
    upper bound ends the iteration)."""
    from rocksdict import ReadOptions

    read = ReadOptions()
    read.set_iterate_upper_bound(prefix_end(prefix) if end is None else end)
    if not fill_cache:
        read.fill_cache(False)  # type: ignore[call-arg]  # the stub omits the flag
    return list(source.values(from_key=prefix, read_opt=read))


def snapshot_get(snapshot: Any, key: bytes) -> bytes | None:
    """A value from a rocksdict Snapshot as of the snapshot (point reads honour it; rocksdict's
    snapshot *iterators* do not, see read_row). A missing key raises a bare Exception there."""
    try:
        return snapshot[key]
    except Exception:  # noqa: BLE001 - rocksdict's "not found"
        return None


def offset_key_of(partition: int, topic: str) -> bytes:
    """The framework's stored next offset of a partition (read from snapshots)."""
    return offset_key(partition, topic)


def watermark_key_of(partition: int) -> bytes:
    return watermark_key(partition)


def decode_offset(value: bytes) -> int:
    """Offsets and watermarks are big-endian int64, as the framework writes them."""
    return BIG_I64.unpack(value)[0]


def partitions_in(store: StateStore) -> list[int]:
    """Partitions that have any key in the store, by skip-scanning the 2-byte prefixes."""
    found: list[int] = []
    start = b"\x00\x00"
    while True:
        first = next(iter(store.db.keys(from_key=start)), None)
        if not isinstance(first, bytes) or len(first) < 2:
            return found
        partition = int.from_bytes(first[:2], "big")
        found.append(partition)
        if partition == 0xFFFF:
            return found
        start = partition_prefix(partition + 1)


def load_partition(store: StateStore, partition: int) -> tuple[int, dict[int, ItemRecord]]:
    """(N_p, item records) of one partition, for building the in-memory item table at start."""
    users = decode_counts(store.get(counts_key(partition)))
    items: dict[int, ItemRecord] = {}
    prefix = partition_prefix(partition) + KIND_ITEM
    cut = len(prefix)
    for key, value in store.scan_prefix(prefix):
        items[BIG_U64.unpack_from(key, cut)[0]] = ItemRecord.decode(value)
    return users, items


def read_row(source: Any, partitions: Iterable[int], media: int) -> np.ndarray:
    """All chunks of an item's neighbour row over the given partitions (not yet aggregated).

    rocksdict 0.3.29 iterates a Snapshot over the *current* data (checked: Snapshot.items sees
    writes made after the snapshot), so a row may be newer than the view it is scored with;
    callers must tolerate neighbours the view does not know yet."""
    chunks: list[bytes] = []
    for partition in partitions:
        chunks.extend(scan_values(source, row_prefix(partition, media), False))
    return decode_row(chunks)


def stored_pairs(
    store: StateStore, partitions: Iterable[int]
) -> dict[tuple[int, int], tuple[int, int]]:
    """Every stored pair statistic {(i, j): (D_ij, c_ij)} summed over partitions (tests, tools)."""
    totals: dict[tuple[int, int], list[int]] = {}
    for partition in partitions:
        prefix = partition_prefix(partition) + KIND_ROW
        cut = len(prefix)
        current: int | None = None
        chunks: list[bytes] = []

        def flush(item: int | None, chunks: list[bytes]) -> None:
            if item is None:
                return
            for entry in aggregate_row(decode_row(chunks)):
                acc = totals.setdefault((item, int(entry["j"])), [0, 0])
                acc[0] += int(entry["d"])
                acc[1] += int(entry["c"])

        for key, value in store.scan_prefix(prefix):
            item = BIG_U64.unpack_from(key, cut)[0]
            if item != current:
                flush(current, chunks)
                current, chunks = item, []
            chunks.append(value)
        flush(current, chunks)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def stored_items(
    store: StateStore, partitions: Iterable[int]
) -> tuple[int, dict[int, tuple[int, int, int]]]:
    """(N, {media: (S, Q, n)}) summed over partitions, straight from RocksDB (tests, tools)."""
    total_users = 0
    items: dict[int, list[int]] = {}
    for partition in partitions:
        users, records = load_partition(store, partition)
        total_users += users
        for media, record in records.items():
            acc = items.setdefault(media, [0, 0, 0])
            acc[0] += record.s
            acc[1] += record.q
            acc[2] += record.n
    return total_users, {k: (v[0], v[1], v[2]) for k, v in items.items()}
