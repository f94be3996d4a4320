"""Columnar decoding of a Kafka batch of ViewEvent records: numpy arrays, no message objects.

The consumers' hot path used to build one protobuf message per record and read its fields one
attribute at a time. Here all records of a batch are scanned together, one field position at a
time across every record, with array operations. Records in the one layout protobuf writes for
an event with every field set (what ingest produces) are read by a shorter path that expects
each tag in turn (`_complete`); the rest go through the general scan. Only the canonical
encoding that protobuf writers produce is handled (fields in ascending number, each at most
once, one-byte tags, ASCII event ids); every other record, including malformed ones, is
flagged `fast[i] == False` and left to protobuf's own parser, so what a record means is always
what protobuf says.
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
    in one buffer (e.g. the repeated field of a request): no slice and no join per event.
    Records in the layout protobuf writes for a complete event (`_complete`) are read field
    after field; only the others go through the general scan (`_general`)."""
    count = len(starts)
    buf = np.frombuffer(raw + bytes(_PAD), np.uint8)
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    found = _complete(buf, starts, ends)
    rest = np.flatnonzero(~found.ok)
    if len(rest):
        general = _general(buf, starts[rest], ends[rest])
        for name in _Found.__dataclass_fields__:
            getattr(found, name)[rest] = getattr(general, name)
    ok = found.ok
    # Slices of the joined buffer, cut in C (map over slice objects): one id per record.
    take = ok & found.has_id
    id_start = np.where(take, found.id_start, 0)
    id_end = id_start + np.where(take, found.id_length, 0)
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
    has_time = found.has_time
    return ViewEventColumns(
        fast=ok,
        event_id=event_id,
        media_id=signed(found.media_id) * keep,
        user_id=signed(found.user_id) * keep,
        # event_type is int32 and nanos int32: protobuf keeps the low 32 bits of the varint.
        event_type=signed(found.event_type).astype(np.int32).astype(np.int64) * keep,
        has_time=has_time & ok,
        seconds=signed(found.seconds) * keep * has_time,
        nanos=signed(found.nanos).astype(np.int32).astype(np.int64) * keep * has_time,
    )


@dataclass
class _Found:
    """Raw fields of each record as read from the wire (varints as uint64); `ok` False: not
    read (the record is not in the layout the reader handles)."""

    ok: np.ndarray
    has_id: np.ndarray
    id_start: np.ndarray  # offset of the event id in the buffer
    id_length: np.ndarray
    media_id: np.ndarray
    user_id: np.ndarray
    event_type: np.ndarray
    has_time: np.ndarray
    seconds: np.ndarray
    nanos: np.ndarray


# Tags (field number << 3 | wire type) of a complete event, in the order protobuf writes them,
# from the same field specs the general scan reads.
_EVENT_ID, _MEDIA_ID, _USER_ID, _EVENT_TYPE, _EVENT_TIME = (
    n << 3 | w for n, w in _VIEW_EVENT.items()
)
_SECONDS, _NANOS = (n << 3 | w for n, w in _TIMESTAMP.items())


def _complete(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> _Found:
    """Records laid out as protobuf writes an event with every field set: event id (shorter
    than 128 bytes), media, user, event type, then the event time with its seconds and
    optionally its nanos, and nothing after. Each field is read at once for every record (a
    few array operations per field instead of a general scan's tag dispatch: about a third of
    the work); a record that strays from the layout anywhere gets `ok` False.

    Positions are never clamped, only the bytes read at them: a length that points past the
    buffer reads the zero padding, which matches no tag, and the record is then not ok."""
    count = len(starts)
    limit = len(buf) - _PAD

    def byte_at(position: np.ndarray) -> np.ndarray:
        return buf[np.minimum(position, limit)].astype(np.int64)

    def varint_at(position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _varints(buf, np.minimum(position, limit))

    ok = byte_at(starts) == _EVENT_ID
    id_length = byte_at(starts + 1)
    ok &= id_length < 0x80
    id_start = starts + 2
    position = id_start + id_length
    varints = []
    for tag in (_MEDIA_ID, _USER_ID, _EVENT_TYPE):
        ok &= byte_at(position) == tag
        value, length = varint_at(position + 1)
        ok &= length > 0
        varints.append(value)
        position = position + 1 + length
    ok &= byte_at(position) == _EVENT_TIME
    time_length = byte_at(position + 1)
    ok &= time_length < 0x80
    time_end = position + 2 + time_length
    position = position + 2
    ok &= byte_at(position) == _SECONDS
    seconds, length = varint_at(position + 1)
    ok &= length > 0
    position = position + 1 + length
    nanos = np.zeros(count, np.uint64)
    with_nanos = np.flatnonzero(ok & (position < time_end))
    if len(with_nanos):
        at = position[with_nanos]
        value, length = varint_at(at + 1)
        ok[with_nanos] &= (byte_at(at) == _NANOS) & (length > 0)
        nanos[with_nanos] = value
        position[with_nanos] = at + 1 + length
    ok &= (position == time_end) & (time_end == ends)
    return _Found(
        ok=ok,
        has_id=np.ones(count, bool),
        id_start=id_start,
        id_length=id_length,
        media_id=varints[0],
        user_id=varints[1],
        event_type=varints[2],
        has_time=np.ones(count, bool),
        seconds=seconds,
        nanos=nanos,
    )


def _general(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> _Found:
    """Any canonical encoding (fields in ascending number, each at most once, absent ones
    left out), through `_scan`."""
    ok, top = _scan(buf, starts, ends, _VIEW_EVENT)
    id_present, id_offset, id_length = top[1]
    time_present, time_offset, time_length = top[5]
    time_start = time_offset.astype(np.int64)
    time_ok, inner = _scan(buf, time_start, time_start + time_length, _TIMESTAMP)
    ok &= time_ok | ~time_present
    return _Found(
        ok=ok,
        has_id=id_present,
        id_start=id_offset.astype(np.int64),
        id_length=id_length,
        media_id=top[2][1],
        user_id=top[3][1],
        event_type=top[4][1],
        has_time=time_present,
        seconds=inner[1][1],
        nanos=inner[2][1],
    )
