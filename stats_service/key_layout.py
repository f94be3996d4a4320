"""RocksDB key and value layout of the stats service: the one place that knows the bytes.

Every key starts with the 2-byte partition prefix (see viewevents.state.keys), then one kind byte.
Numbers in keys are big-endian so that RocksDB's byte order is numeric order; times in keys are
biased by 2**63 so that (theoretical) negative times still sort before positive ones. Values are
little-endian int64 rows so that numpy reads and writes many of them in one call.

  T media                     -> totals: view_time, starts, stops, ends, uniques, first, last
  U media user                -> b""      the user has watched the media item (all-time)
  P media day user            -> minute bitmap of that day (1440 bits, 180 bytes LE)
  Q day media user            -> the same bitmap, day-major (ranking by unique viewers)
  H media hour                -> hour row: the hour's bucket (5 x int64: view_time, starts,
                                 stops, ends, uniques), then its 60 minute buckets (60 x 5
                                 x int32): minutes cost no keys of their own
  D media day                 -> day bucket (5 x int64)
  h hour media                -> the hour bucket of H (5 x int64), hour-major (ranking index)
  d day media                 -> copy of D, day-major (ranking index)
  M                           -> first day whose minute detail is still kept (minute retention)

Minute retention (stats_minute_retention_days) prunes a day's minute detail: its P and Q
bitmaps become 3-byte hour masks (bit h: an event in hour h) and its H rows keep only the hour
bucket (40 bytes). Readers take both forms: `minute_bitmaps` expands an hour mask to every
minute of its hours, `hour_rows_and_pruned` says which hour rows lost their minutes.

`day`, `hour` and `minute` are the bucket's start in Unix seconds. The framework's kinds
(viewevents.state.keys: offsets, watermark, de-duplication) are checked not to clash; its
watermark is also the trend-retention cut-off.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat
from operator import is_

import numpy as np

from viewevents.state.codecs import BIG_U64
from viewevents.state.keys import check_service_kinds, partition_prefix

KIND_TOTALS = b"T"
KIND_VIEWER = b"U"
KIND_PRESENCE = b"P"
KIND_PRESENCE_BY_DAY = b"Q"
KIND_MINUTES_KEPT_FROM = b"M"

MINUTE, HOUR, DAY = 60, 3600, 86_400
# Media-major trend rows per bucket size, and the bucket-major copies kept for ranking.
# Minute buckets live inside the hour rows.
KIND_BUCKET = {HOUR: b"H", DAY: b"D"}
KIND_RANK = {HOUR: b"h", DAY: b"d"}

check_service_kinds(
    {
        KIND_TOTALS,
        KIND_VIEWER,
        KIND_PRESENCE,
        KIND_PRESENCE_BY_DAY,
        KIND_MINUTES_KEPT_FROM,
        *KIND_BUCKET.values(),
        *KIND_RANK.values(),
    }
)

BIAS = 1 << 63
MINUTES_PER_DAY = 1440
BITMAP_BYTES = MINUTES_PER_DAY // 8
HOUR_MASK_BYTES = 3  # a pruned day's bitmap: 24 bits, one per hour

TOTALS_FIELDS = 7  # view_time, starts, stops, ends, uniques, first_time, last_time
BUCKET_FIELDS = 5  # view_time, starts, stops, ends, uniques
I64_MAX = np.iinfo(np.int64).max
I64_MIN = np.iinfo(np.int64).min
EMPTY_TOTALS = np.array([0, 0, 0, 0, 0, I64_MAX, I64_MIN], "<i8").tobytes()
EMPTY_BUCKET = bytes(8 * BUCKET_FIELDS)
HOUR_ROW = np.dtype([("hour", "<i8", (BUCKET_FIELDS,)), ("minutes", "<i4", (60, BUCKET_FIELDS))])
EMPTY_HOUR_ROW = bytes(HOUR_ROW.itemsize)

_TOTALS = struct.Struct("<7q")
_BUCKET = struct.Struct("<5q")


def biased(seconds: int) -> bytes:
    """A time as 8 key bytes that sort like the number."""
    return BIG_U64.pack(seconds + BIAS)


def unbiased(data: bytes) -> int:
    return BIG_U64.unpack(data)[0] - BIAS


def u64(value: int) -> bytes:
    return BIG_U64.pack(value)


# --- reading keys back ----------------------------------------------------------------------
# After the partition (2 bytes) and the kind (1 byte), keys hold 8-byte big-endian columns.

COLUMN_START = 3
COLUMN_BYTES = 8


def column_offset(index: int) -> int:
    """Byte offset of a key's `index`-th 8-byte column (0: the first after the kind)."""
    return COLUMN_START + COLUMN_BYTES * index


def last_column(key: bytes) -> bytes:
    """The key's last 8-byte column: a bucket row's start, a ranking row's media id."""
    return key[-COLUMN_BYTES:]


def key_columns(keys: Sequence[bytes], index: int) -> np.ndarray:
    """The `index`-th column of equally long keys as int64 (ids; biased times stay biased)."""
    return matrix_column(key_matrix(keys), index)


def key_matrix(keys: Sequence[bytes]) -> np.ndarray:
    """Equally long keys as one (n, key length) uint8 matrix: join once, read many columns."""
    return np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), -1)


def matrix_column(matrix: np.ndarray, index: int) -> np.ndarray:
    """The `index`-th 8-byte column of a `key_matrix` as int64."""
    start = column_offset(index)
    column = np.ascontiguousarray(matrix[:, start : start + COLUMN_BYTES]).view(">u8")[:, 0]
    return column.astype(np.int64)


def hour_row_key_of_rank_key(partition: int, rank_key: bytes) -> bytes:
    """The media-major hour row (H media hour) behind an hour ranking row (h hour media)."""
    start = column_offset(0)
    hour = rank_key[start : start + COLUMN_BYTES]
    return partition_prefix(partition) + KIND_BUCKET[HOUR] + last_column(rank_key) + hour


# --- single keys (queries) ------------------------------------------------------------------


def totals_key(partition: int, media_id: int) -> bytes:
    return partition_prefix(partition) + KIND_TOTALS + u64(media_id)


def bucket_prefix(partition: int, size: int, media_id: int) -> bytes:
    """Prefix of one media item's trend rows at one bucket size; append biased(start)."""
    return partition_prefix(partition) + KIND_BUCKET[size] + u64(media_id)


def rank_prefix(partition: int, size: int) -> bytes:
    """Prefix of the bucket-major ranking rows; append biased(start) + u64(media)."""
    return partition_prefix(partition) + KIND_RANK[size]


def presence_prefix(partition: int, media_id: int) -> bytes:
    """Prefix of one media item's day bitmaps; append biased(day) + u64(user)."""
    return partition_prefix(partition) + KIND_PRESENCE + u64(media_id)


def minutes_kept_from_key(partition: int) -> bytes:
    return partition_prefix(partition) + KIND_MINUTES_KEPT_FROM


def presence_by_day_prefix(partition: int) -> bytes:
    """Prefix of the day-major bitmaps; append biased(day) + u64(media) + u64(user)."""
    return partition_prefix(partition) + KIND_PRESENCE_BY_DAY


# --- values ---------------------------------------------------------------------------------


def decode_totals(value: bytes) -> tuple[int, ...]:
    return _TOTALS.unpack(value)


def decode_bucket(value: bytes) -> tuple[int, int, int, int, int]:
    view_time, starts, stops, ends, uniques = _BUCKET.unpack(value)
    return view_time, starts, stops, ends, uniques


def absent(values: Sequence[bytes | None]) -> np.ndarray:
    """Which stored values are missing (None), tested in C rather than in a Python loop."""
    return np.fromiter(map(is_, values, repeat(None)), bool, len(values))


def joined(values: Sequence[bytes | None], empty: bytes) -> bytes:
    """The stored values end to end, `empty` standing for each missing one."""
    if None not in values:
        return b"".join(values)  # type: ignore[arg-type] # no None, checked in C
    return b"".join([empty if v is None else v for v in values])


def rows_from_values(values: Sequence[bytes | None], empty: bytes, width: int) -> np.ndarray:
    """Stored rows (None = absent, read as `empty`) as one writable int64 matrix."""
    return np.frombuffer(joined(values, empty), "<i8").reshape(len(values), width).copy()


def hour_rows_from_values(values: Sequence[bytes | None]) -> np.ndarray:
    """Stored hour rows (None = absent) as one writable structured array of HOUR_ROW."""
    return np.frombuffer(joined(values, EMPTY_HOUR_ROW), HOUR_ROW).copy()


def hour_rows_and_pruned(values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Stored hour rows, full or pruned to their hour bucket (minutes then zero), and which
    were pruned."""
    pruned = np.array([v is not None and len(v) < HOUR_ROW.itemsize for v in values], bool)
    if not pruned.any():
        return hour_rows_from_values(values), pruned
    tail = bytes(HOUR_ROW.itemsize - 8 * BUCKET_FIELDS)
    return (
        hour_rows_from_values(
            [v + tail if v is not None and cut else v for v, cut in zip(values, pruned)]
        ),
        pruned,
    )


def minute_bitmaps(values: Sequence[bytes]) -> np.ndarray:
    """1440-bit minute bitmaps as an (n, BITMAP_BYTES) uint8 matrix; a pruned day's hour mask
    stands for every minute of its hours (ranges on pruned days are rounded to hours)."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))  # C-level, no Python loop
    short = np.flatnonzero(lengths != BITMAP_BYTES).tolist()
    if not short:
        return np.frombuffer(b"".join(values), np.uint8).reshape(len(values), BITMAP_BYTES)
    full = list(values)
    masks = np.frombuffer(b"".join([values[i] for i in short]), np.uint8).reshape(-1, 3)
    hours = np.unpackbits(masks, axis=1, bitorder="little")[:, :24].astype(bool)
    minutes = np.repeat(hours, 60, axis=1)
    packed = np.packbits(minutes, axis=1, bitorder="little")
    for i, row in zip(short, packed):
        full[i] = row.tobytes()
    return np.frombuffer(b"".join(full), np.uint8).reshape(len(values), BITMAP_BYTES)


def hour_mask_values(bitmaps: Sequence[bytes]) -> list[bytes]:
    """The 3-byte hour masks that replace 1440-bit minute bitmaps when a day is pruned."""
    if not bitmaps:
        return []
    bits = np.unpackbits(minute_bitmaps(bitmaps), axis=1, bitorder="little")
    hours = bits.reshape(len(bitmaps), 24, 60).any(axis=2)
    packed = np.packbits(hours, axis=1, bitorder="little")  # (n, 3)
    return np.frombuffer(packed.tobytes(), f"V{HOUR_MASK_BYTES}").tolist()


def values_of_records(rows: np.ndarray) -> list[bytes]:
    """One value per structured-array element."""
    if len(rows) == 0:
        return []
    return np.frombuffer(rows.tobytes(), f"V{rows.dtype.itemsize}").tolist()


def values_from_rows(rows: np.ndarray) -> list[bytes]:
    """One value per matrix row, without a Python loop over the numbers."""
    rows = np.ascontiguousarray(rows, "<i8")
    if len(rows) == 0:
        return []
    return np.frombuffer(rows.tobytes(), f"V{rows.shape[1] * 8}").tolist()


# --- many keys at once (the consumer's hot path) --------------------------------------------


def pack_keys(
    prefix: bytes, columns: Sequence[np.ndarray], biased_columns: Sequence[bool]
) -> list[bytes]:
    """prefix + each column as 8 big-endian bytes (biased when flagged), for every row at once."""
    count = len(columns[0]) if columns else 0
    if count == 0:
        return []
    fields = [("prefix", f"V{len(prefix)}")] + [(f"c{i}", ">u8") for i in range(len(columns))]
    packed = np.empty(count, np.dtype(fields))
    packed["prefix"] = np.frombuffer(prefix, f"V{len(prefix)}")[0]
    for i, (column, is_biased) in enumerate(zip(columns, biased_columns)):
        as_u64 = np.asarray(column, np.int64).view(np.uint64)
        packed[f"c{i}"] = as_u64 ^ np.uint64(BIAS) if is_biased else as_u64
    return np.frombuffer(packed.tobytes(), f"V{packed.dtype.itemsize}").tolist()
