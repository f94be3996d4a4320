"""RocksDB key and value layout of the stats service: the one place that knows the bytes.

Every key starts with the 2-byte partition prefix (see viewevents.state.keys), then one kind byte.
Numbers in keys are big-endian so that RocksDB's byte order is numeric order; times in keys are
biased by 2**63 so that (theoretical) negative times still sort before positive ones. Values are
little-endian int64 rows so that numpy reads and writes many of them in one call.

  T media                     -> totals: view_time, starts, stops, ends, uniques, first, last
  U media user                -> b""      the user has watched the media item (all-time)
  P media day user            -> the minutes of that day with events: a sorted list of
                                 minute indexes (uint16 LE, 2 bytes each) while it has fewer
                                 than 90, else a bitmap (1440 bits, 180 bytes LE)
  Q day media user            -> the same value, day-major (ranking by unique viewers)
  H media hour                -> hour row: the hour's bucket (5 x int64: view_time, starts,
                                 stops, ends, uniques), then its minute buckets: while at
                                 most 57 minutes have events, only those, each as (minute
                                 index uint8, 5 x int32) = 21 bytes in minute order; else all
                                 60 (60 x 5 x int32, 1240 bytes in all): minutes cost no keys
                                 of their own
  D media day                 -> day bucket (5 x int64)
  h hour media                -> the hour bucket of H (5 x int64), hour-major (ranking index)
  d day media                 -> copy of D, day-major (ranking index)
  M                           -> first day whose minute detail is still kept (minute retention)

The value's length tells the form: a presence value of 180 bytes is a bitmap, of 3 bytes an
hour mask (below), of any even length below 180 a minute list; an hour row of 1240 bytes is
full, of 40 bytes pruned (below), of 40 + 21 x n bytes (1 <= n <= 57) sparse. The sparse forms
keep sparse data (one event per media-hour and viewer-day) at about 1/20 of the full forms'
bytes; the full forms are older stores' only form and stay valid (rows are rewritten in
whichever form is smaller, so old and new rows mix). Readers expand every form to the full
one: `presence_bitmaps` / `minute_bitmaps` and `hour_rows_and_pruned`.

Minute retention (stats_minute_retention_days) prunes a day's minute detail: its P and Q
bitmaps become 3-byte hour masks (bit h: an event in hour h) and its H rows keep only the hour
bucket (40 bytes). Readers take these forms too: `minute_bitmaps` expands an hour mask to every
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
# A presence value is a minute list (2 bytes per minute) while that is shorter than a bitmap.
SPARSE_PRESENCE_MAX = BITMAP_BYTES // 2 - 1  # 89 minutes: 178 bytes

TOTALS_FIELDS = 7  # view_time, starts, stops, ends, uniques, first_time, last_time
BUCKET_FIELDS = 5  # view_time, starts, stops, ends, uniques
I64_MAX = np.iinfo(np.int64).max
I64_MIN = np.iinfo(np.int64).min
EMPTY_TOTALS = np.array([0, 0, 0, 0, 0, I64_MAX, I64_MIN], "<i8").tobytes()
EMPTY_BUCKET = bytes(8 * BUCKET_FIELDS)
HOUR_ROW = np.dtype([("hour", "<i8", (BUCKET_FIELDS,)), ("minutes", "<i4", (60, BUCKET_FIELDS))])
EMPTY_HOUR_ROW = bytes(HOUR_ROW.itemsize)
HOUR_BUCKET_BYTES = 8 * BUCKET_FIELDS  # an hour row's own bucket, also its pruned form
# A sparse hour row's minute entries (packed: 21 bytes) and the most it holds: 40 + 21 x 57 =
# 1237 bytes, still shorter than a full row (1240; 1200 is no multiple of 21, so the lengths
# never collide).
MINUTE_ENTRY = np.dtype([("minute", "u1"), ("values", "<i4", (BUCKET_FIELDS,))])
SPARSE_HOUR_MINUTES_MAX = (HOUR_ROW.itemsize - HOUR_BUCKET_BYTES - 1) // MINUTE_ENTRY.itemsize

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


def time_column(matrix: np.ndarray, index: int) -> np.ndarray:
    """The `index`-th column of a `key_matrix` holding a biased time, as int64 seconds."""
    return (matrix_column(matrix, index).view(np.uint64) ^ np.uint64(BIAS)).view(np.int64)


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


def value_lengths(values: Sequence[bytes | None]) -> np.ndarray:
    """Length of each stored value, -1 for a missing one (None)."""
    missing = absent(values)
    if not missing.any():
        return np.fromiter(map(len, values), np.int64, len(values))  # type: ignore[arg-type]
    return np.array([-1 if v is None else len(v) for v in values], np.int64)


def hour_rows_from_values(values: Sequence[bytes | None]) -> np.ndarray:
    """Stored hour rows in any form (None = absent) as one writable structured array of
    HOUR_ROW (a pruned row's minutes read as zero)."""
    return hour_rows_and_pruned(values)[0]


def hour_rows_and_pruned(values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Stored hour rows, full, sparse or pruned to their hour bucket (minutes then zero), as
    full rows, and which were pruned."""
    lengths = value_lengths(values)
    full = HOUR_ROW.itemsize
    pruned = lengths == HOUR_BUCKET_BYTES
    if ((lengths == full) | (lengths < 0)).all():  # only full rows: one join, no scatter
        return np.frombuffer(joined(values, EMPTY_HOUR_ROW), HOUR_ROW).copy(), pruned
    rows = np.zeros(len(values), HOUR_ROW)
    dense = np.flatnonzero(lengths == full)
    if len(dense):
        rows[dense] = np.frombuffer(b"".join([values[i] for i in dense.tolist()]), HOUR_ROW)  # type: ignore[misc]
    cut = np.flatnonzero(pruned)
    if len(cut):
        joined_cut = b"".join([values[i] for i in cut.tolist()])  # type: ignore[misc]
        rows["hour"][cut] = np.frombuffer(joined_cut, "<i8").reshape(-1, BUCKET_FIELDS)
    sparse = np.flatnonzero((lengths > HOUR_BUCKET_BYTES) & (lengths != full))
    if len(sparse):
        # Two slices a row (bucket, entries) joined end to end: numpy then reads each part as
        # one array, cheaper than gathering the bytes by index.
        chosen: list[bytes] = [values[i] for i in sparse.tolist()]  # type: ignore[misc]
        cut_at = HOUR_BUCKET_BYTES
        hours = b"".join([v[:cut_at] for v in chosen])
        rows["hour"][sparse] = np.frombuffer(hours, "<i8").reshape(-1, BUCKET_FIELDS)
        entries = np.frombuffer(b"".join([v[cut_at:] for v in chosen]), MINUTE_ENTRY)
        counts = (lengths[sparse] - HOUR_BUCKET_BYTES) // MINUTE_ENTRY.itemsize
        owner = np.repeat(sparse, counts)
        rows["minutes"][owner, entries["minute"]] = entries["values"]
    return rows, pruned


def hour_row_values(rows: np.ndarray) -> list[bytes]:
    """Stored values of full hour rows (HOUR_ROW), each in the shorter of the sparse form (the
    minutes with any non-zero field) and the full form."""
    count = len(rows)
    if count == 0:
        return []
    minutes = rows["minutes"]
    # A minute is active when any field is non-zero: five strided ORs beat `any` over axis 2.
    has = (
        minutes[:, :, 0] | minutes[:, :, 1] | minutes[:, :, 2] | minutes[:, :, 3] | minutes[:, :, 4]
    ) != 0  # (n, 60)
    counts = has.sum(axis=1)
    sparse = np.flatnonzero(counts <= SPARSE_HOUR_MINUTES_MAX)
    if len(sparse) == count:
        return _sparse_hour_values(rows, has, counts)
    values = values_of_records(rows)
    if len(sparse):
        for i, value in zip(
            sparse.tolist(), _sparse_hour_values(rows[sparse], has[sparse], counts[sparse])
        ):
            values[i] = value
    return values


def _sparse_hour_values(rows: np.ndarray, has: np.ndarray, counts: np.ndarray) -> list[bytes]:
    """The sparse form of every row: hour bucket, then (minute, 5 x int32) per active minute,
    in minute order (the layout `hour_rows_and_pruned` reads back)."""
    owner, minute = np.nonzero(has)  # row-major: by row, then minute
    entries = np.empty(len(owner), MINUTE_ENTRY)
    entries["minute"] = minute
    entries["values"] = rows["minutes"][owner, minute]
    blob = entries.tobytes()
    ends = MINUTE_ENTRY.itemsize * np.cumsum(counts)
    starts = ends - MINUTE_ENTRY.itemsize * counts
    hours = values_from_rows(rows["hour"])
    return [h + blob[a:b] for h, a, b in zip(hours, starts.tolist(), ends.tolist())]


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def presence_bitmaps(values: Sequence[bytes | None]) -> np.ndarray:
    """Stored presence values in any form (None = absent: no minute) as a writable
    (n, BITMAP_BYTES) uint8 matrix of minute bitmaps (an hour mask: every minute of its hours)."""
    lengths = value_lengths(values)
    if ((lengths == BITMAP_BYTES) | (lengths < 0)).all():  # only bitmaps: one join
        empty = bytes(BITMAP_BYTES)
        return np.frombuffer(joined(values, empty), np.uint8).reshape(-1, BITMAP_BYTES).copy()
    out = np.zeros((len(values), BITMAP_BYTES), np.uint8)
    present = np.flatnonzero(lengths >= 0)
    if len(present):
        out[present] = minute_bitmaps([values[i] for i in present.tolist()])  # type: ignore[misc]
    return out


def _set_minutes(bitmaps: np.ndarray, row: np.ndarray, minute: np.ndarray) -> None:
    """Set bits (row, minute) of packed bitmaps; rows ascending, minutes ascending per row."""
    if len(row) == 0:
        return
    byte = minute >> 3
    bit = np.left_shift(np.uint8(1), (minute & 7).astype(np.uint8))
    run = np.ones(len(row), bool)  # one run per (row, byte): OR its bits, then into the byte
    run[1:] = (row[1:] != row[:-1]) | (byte[1:] != byte[:-1])
    first = np.flatnonzero(run)
    bitmaps[row[first], byte[first]] |= np.bitwise_or.reduceat(bit, first)


def minute_bitmaps(values: Sequence[bytes]) -> np.ndarray:
    """1440-bit minute bitmaps as an (n, BITMAP_BYTES) uint8 matrix, from any stored form: a
    bitmap as is, a minute list's minutes, a pruned day's hour mask standing for every minute
    of its hours (ranges on pruned days are rounded to hours)."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))  # C-level, no Python loop
    short = np.flatnonzero(lengths != BITMAP_BYTES).tolist()
    if not short:
        return np.frombuffer(b"".join(values), np.uint8).reshape(len(values), BITMAP_BYTES)
    out = np.zeros((len(values), BITMAP_BYTES), np.uint8)
    dense = np.flatnonzero(lengths == BITMAP_BYTES)
    if len(dense):
        joined_dense = b"".join([values[i] for i in dense.tolist()])
        out[dense] = np.frombuffer(joined_dense, np.uint8).reshape(-1, BITMAP_BYTES)
    masked = np.flatnonzero(lengths == HOUR_MASK_BYTES)
    if len(masked):
        joined_masks = b"".join([values[i] for i in masked.tolist()])
        masks = np.frombuffer(joined_masks, np.uint8).reshape(-1, HOUR_MASK_BYTES)
        hours = np.unpackbits(masks, axis=1, bitorder="little")[:, :24].astype(bool)
        minutes = np.repeat(hours, 60, axis=1)
        out[masked] = np.packbits(minutes, axis=1, bitorder="little")
    listed = np.flatnonzero((lengths != BITMAP_BYTES) & (lengths != HOUR_MASK_BYTES))
    if len(listed):
        minute = np.frombuffer(b"".join([values[i] for i in listed.tolist()]), "<u2")
        row = np.repeat(listed, lengths[listed] // 2)
        _set_minutes(out, row, minute.astype(np.int64))
    return out


def presence_values(bitmaps: np.ndarray) -> list[bytes]:
    """Stored values of (n, BITMAP_BYTES) minute bitmaps: a minute list while it is shorter
    than the bitmap, else the bitmap."""
    count = len(bitmaps)
    if count == 0:
        return []
    counts = _POPCOUNT[bitmaps].sum(axis=1, dtype=np.int64)
    sparse = np.flatnonzero(counts <= SPARSE_PRESENCE_MAX)
    if len(sparse) == count:
        return _minute_lists(bitmaps, counts)
    values: list[bytes] = np.frombuffer(
        np.ascontiguousarray(bitmaps).tobytes(), f"V{BITMAP_BYTES}"
    ).tolist()
    for i, value in zip(sparse.tolist(), _minute_lists(bitmaps[sparse], counts[sparse])):
        values[i] = value
    return values


def _minute_lists(bitmaps: np.ndarray, counts: np.ndarray) -> list[bytes]:
    """Each bitmap's set minutes, ascending, as uint16 LE bytes (only non-zero bytes unpacked)."""
    row, byte = np.nonzero(bitmaps)  # row-major: by row, then byte
    bits = np.unpackbits(bitmaps[row, byte][:, None], axis=1, bitorder="little")
    which, bit = np.nonzero(bits)  # by non-zero byte, then bit: minutes ascending per row
    minutes = (byte[which] * 8 + bit).astype("<u2")
    blob = minutes.tobytes()
    ends = 2 * np.cumsum(counts)
    starts = ends - 2 * counts
    return [blob[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def minute_set(value: bytes) -> int:
    """One stored presence value that is not an hour mask as a Python int of its minute bits."""
    if len(value) == BITMAP_BYTES:
        return int.from_bytes(value, "little")
    bits = 0
    for minute in np.frombuffer(value, "<u2").tolist():
        bits |= 1 << minute
    return bits


def hour_mask_values(bitmaps: Sequence[bytes]) -> list[bytes]:
    """The 3-byte hour masks that replace minute bitmaps (any form) when a day is pruned."""
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
    return pack_keys_of([prefix], [count], columns, biased_columns)


def pack_keys_of(
    prefixes: Sequence[bytes],
    counts: Sequence[int],
    columns: Sequence[np.ndarray],
    biased_columns: Sequence[bool],
) -> list[bytes]:
    """`pack_keys` for consecutive runs of rows, `counts[i]` rows under `prefixes[i]` (all of
    one length): the keys of many buckets' reads packed at once."""
    count = len(columns[0]) if columns else 0
    if count == 0:
        return []
    width = len(prefixes[0])
    fields = [("prefix", f"V{width}")] + [(f"c{i}", ">u8") for i in range(len(columns))]
    packed = np.empty(count, np.dtype(fields))
    heads = np.frombuffer(b"".join(prefixes), f"V{width}")
    if len(heads) != len(prefixes):
        raise ValueError("prefixes of different lengths")
    packed["prefix"] = heads[0] if len(heads) == 1 else np.repeat(heads, counts)
    for i, (column, is_biased) in enumerate(zip(columns, biased_columns)):
        as_u64 = np.asarray(column, np.int64).view(np.uint64)
        packed[f"c{i}"] = as_u64 ^ np.uint64(BIAS) if is_biased else as_u64
    return np.frombuffer(packed.tobytes(), f"V{packed.dtype.itemsize}").tolist()
