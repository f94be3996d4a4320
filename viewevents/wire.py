"""Columnar decoding of a Kafka batch of ViewEvent records: numpy arrays, no message objects.

The consumers' hot path used to build one protobuf message per record and read its fields one
attribute at a time. Here all records of a batch are scanned together, one field position at a
time across every record, with array operations. Only the canonical encoding that protobuf
writers produce is handled (fields in ascending number, each at most once, one-byte tags, ASCII
event ids); every other record, including malformed ones, is flagged `fast[i] == False` and
left to protobuf's own parser, so what a record means is always what protobuf says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VARINT, LEN = 0, 2
_VIEW_EVENT = {1: LEN, 2: VARINT, 3: VARINT, 4: VARINT, 5: LEN}
_TIMESTAMP = {1: VARINT, 2: VARINT}
_PAD = 24  # zero bytes after the buffer: a varint read never runs past it


@dataclass
class ViewEventColumns:
    """Fields of each record (proto3 defaults where absent); rows with `fast` False hold
    nothing meaningful and must be parsed by protobuf."""

    fast: np.ndarray  # bool
    event_id: list[bytes]  # b"" where absent or not fast
    media_id: np.ndarray  # int64
    user_id: np.ndarray
    event_type: np.ndarray
    has_time: np.ndarray  # bool
    seconds: np.ndarray  # int64
    nanos: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.fast)


def _varints(buf: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values (as uint64) and byte lengths of the varints starting at `at`; length 0 (and
    value 0) when a varint is longer than 10 bytes (invalid). One array pass per byte position,
    only over the varints still going on: fields here take 1 to 5 bytes, rarely all 10."""
    count = len(at)
    value = np.zeros(count, np.uint64)
    length = np.zeros(count, np.int64)
    going = np.arange(count)
    for k in range(10):
        byte = buf[at[going] + k]
        value[going] |= (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        ended = byte < 0x80
        length[going[ended]] = k + 1
        going = going[~ended]
        if not len(going):
            break
    value[going] = 0
    return value, length


def _scan(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, spec: dict[int, int]
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Scan messages buf[starts:ends] whose fields are in `spec` (number -> wire type).

    Returns (ok, fields): fields[number] = (present, value, length) where value is the varint,
    or the payload offset for LEN fields with `length` its size.
    """
    count = len(starts)
    ok = np.ones(count, bool)
    pos = starts.astype(np.int64).copy()
    last_field = np.zeros(count, np.int64)
    fields = {
        number: (np.zeros(count, bool), np.zeros(count, np.uint64), np.zeros(count, np.int64))
        for number in spec
    }
    for _ in range(len(spec) + 1):
        active = np.flatnonzero(ok & (pos < ends))
        if len(active) == 0:
            break
        at = pos[active]
        tag = buf[at].astype(np.int64)
        number, wire = tag >> 3, tag & 7
        expected = np.full(len(active), -1)
        for field, kind in spec.items():
            expected[number == field] = kind
        good = (tag < 0x80) & (number > last_field[active]) & (wire == expected)
        value, length = _varints(buf, at + 1)
        good &= length > 0
        next_pos = at + 1 + length
        is_len = wire == LEN
        payload = value.astype(np.int64)
        good &= ~is_len | ((value < (1 << 31)) & (next_pos + payload <= ends[active]))
        next_pos = np.where(is_len, next_pos + payload, next_pos)
        ok[active[~good]] = False
        for field, kind in spec.items():
            hit = good & (number == field)
            rows = active[hit]
            present, values, sizes = fields[field]
            present[rows] = True
            if kind == LEN:
                values[rows] = (at + 1 + length)[hit].astype(np.uint64)
                sizes[rows] = payload[hit]
            else:
                values[rows] = value[hit]
        last_field[active[good]] = number[good]
        pos[active[good]] = next_pos[good]
    ok &= pos == ends  # more fields than the spec allows, or an overrun: not canonical
    return ok, fields


def unscanned(count: int) -> ViewEventColumns:
    """Columns of `count` records that were not scanned: every row is left to protobuf."""
    zeros = np.zeros(count, np.int64)
    no = np.zeros(count, bool)
    return ViewEventColumns(
        fast=no,
        event_id=[b""] * count,
        media_id=zeros,
        user_id=zeros.copy(),
        event_type=zeros.copy(),
        has_time=no.copy(),
        seconds=zeros.copy(),
        nanos=zeros.copy(),
    )


def decode_view_events(values: Sequence[bytes]) -> ViewEventColumns:
    """The ViewEvent fields of each serialized record, decoded for the whole batch at once."""
    count = len(values)
    lengths = np.fromiter(map(len, values), np.int64, count)
    ends = np.cumsum(lengths)
    return decode_view_event_spans(b"".join(values), ends - lengths, ends)


def decode_view_event_spans(raw: bytes, starts: np.ndarray, ends: np.ndarray) -> ViewEventColumns:
    """`decode_view_events` of the serialized events raw[starts[i]:ends[i]], which already lie
    in one buffer (e.g. the repeated field of a request): no slice and no join per event."""
    count = len(starts)
    buf = np.frombuffer(raw + bytes(_PAD), np.uint8)
    ok, top = _scan(buf, starts, ends, _VIEW_EVENT)
    id_present, id_offset, id_length = top[1]
    time_present, time_offset, time_length = top[5]
    time_start = time_offset.astype(np.int64)
    time_ok, inner = _scan(buf, time_start, time_start + time_length, _TIMESTAMP)
    ok &= time_ok | ~time_present
    # Slices of the joined buffer, cut in C (map over slice objects): one id per record.
    take = ok & id_present
    id_start = np.where(take, id_offset.astype(np.int64), 0)
    id_end = id_start + np.where(take, id_length, 0)
    event_id = list(map(raw.__getitem__, map(slice, id_start.tolist(), id_end.tolist())))
    # Strings must be valid UTF-8 for protobuf; ASCII certainly is, anything else goes the slow way.
    non_ascii = np.flatnonzero(~np.fromiter(map(bytes.isascii, event_id), bool, count))
    if len(non_ascii):
        ok[non_ascii] = False
        for row in non_ascii.tolist():
            event_id[row] = b""

    def signed(values: np.ndarray) -> np.ndarray:
        return values.view(np.int64)

    keep = ok.astype(np.int64)
    return ViewEventColumns(
        fast=ok,
        event_id=event_id,
        media_id=signed(top[2][1]) * keep,
        user_id=signed(top[3][1]) * keep,
        # event_type is int32 and nanos int32: protobuf keeps the low 32 bits of the varint.
        event_type=signed(top[4][1]).astype(np.int32).astype(np.int64) * keep,
        has_time=time_present & ok,
        seconds=signed(inner[1][1]) * keep * time_present,
        nanos=signed(inner[2][1]).astype(np.int32).astype(np.int64) * keep * time_present,
    )
