"""Serialized UploadRequests read without a protobuf message per event.

Building a message per event and reading its fields back one attribute at a time was most of
the ingest service's CPU. Here a request's bytes are scanned once for the events' byte spans,
the spans are decoded together into columns (`viewevents.wire`, as the consumers do), and an
event whose bytes are exactly what protobuf would serialize for it keeps those bytes as its
record value (the record value is the serialized ViewEvent), so nothing is re-encoded.

Protobuf stays the authority on what bytes mean. The request's top level is only taken when it
is in the plain form writers produce (field 1 events, field 2 sequence, one-byte tags, lengths
in bounds); otherwise `scan_upload_request` returns None and the caller parses the request with
protobuf as before. An event that is not canonical (unknown fields, fields out of order or
repeated, default values written out, over-long varints, non-ASCII ids, ...) is parsed by
protobuf alone and re-serialized, exactly like the message path; if protobuf cannot parse it,
the scan gives up (None) and protobuf's parse of the whole request reports the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from ingest_service.columns import surely_valid_columns
from ingest_service.planning import RequestEvents
from ingest_service.validation import Limits
from viewevents.v1 import view_event_pb2
from viewevents.wire import ViewEventColumns, decode_view_event_spans

ViewEvent = view_event_pb2.ViewEvent
_EVENTS_TAG = 0x0A  # field 1 (events), wire type 2 (length-delimited)
_SEQUENCE_TAG = 0x10  # field 2 (sequence), wire type 0 (varint)
# Smallest value needing 2, 3, ... 10 varint bytes.
_VARINT_STEPS = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)


@dataclass
class ScannedRequest:
    """An UploadRequest's events as byte spans of `data` with their decoded fields."""

    data: bytes
    starts: np.ndarray  # int64; event i is data[starts[i]:ends[i]]
    ends: np.ndarray
    sequence: int
    columns: ViewEventColumns
    canonical: np.ndarray  # bool: the span is the event's exact serialization, columns exact
    parsed: dict[int, ViewEvent] = field(default_factory=dict)  # the other events, by protobuf

    def __len__(self) -> int:
        return len(self.starts)

    def message(self, index: int) -> ViewEvent:
        """Event `index` as a protobuf message (the exact validation and dead letters)."""
        found = self.parsed.get(index)
        if found is None:
            found = self.parsed[index] = ViewEvent.FromString(self._span(index))
        return found

    def _span(self, index: int) -> bytes:
        return self.data[int(self.starts[index]) : int(self.ends[index])]

    def events(self, now_seconds: float, limits: Limits) -> RequestEvents:
        """The events for `planning.plan`: canonical ones straight from the columns and bytes,
        the others from their protobuf messages."""
        c = self.columns
        data = self.data
        values = [data[start:end] for start, end in zip(self.starts.tolist(), self.ends.tolist())]
        users = c.user_id.copy()
        for index, event in self.parsed.items():
            values[index] = event.SerializeToString()
            users[index] = event.user_id
        surely = self.canonical & surely_valid_columns(
            media=c.media_id,
            users=c.user_id,
            kinds=c.event_type,
            id_chars=np.fromiter(map(len, c.event_id), np.int64, len(c)),  # ASCII: bytes
            has_time=c.has_time,
            seconds=c.seconds,
            nanos=c.nanos,
            now_seconds=now_seconds,
            limits=limits,
        )
        return RequestEvents(values, users, surely, self.message)


def split_upload_request(data: bytes) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(starts, ends, sequence) of a serialized UploadRequest in its plain form, else None."""
    plain = _plain_events(data)
    buf = np.frombuffer(data, np.uint8)
    tags = np.array(plain, np.int64)
    starts = tags + 2
    ends = starts + buf[tags + 1] if len(tags) else starts
    pos = plain[-1] + 2 + data[plain[-1] + 1] if plain else 0
    rest = _other_fields(data, pos)
    if rest is None:
        return None
    more_starts, more_ends, sequence = rest
    if more_starts:
        starts = np.concatenate([starts, np.array(more_starts, np.int64)])
        ends = np.concatenate([ends, np.array(more_ends, np.int64)])
    return starts, ends, sequence


def _plain_events(data: bytes) -> list[int]:
    """Where the leading run of events with a one-byte length starts (their tag byte): the
    common case, read with as little work per event as Python allows."""
    tags: list[int] = []
    append = tags.append
    size = len(data)
    pos = 0
    while pos + 1 < size and data[pos] == _EVENTS_TAG:
        length = data[pos + 1]
        if length >= 0x80 or pos + 2 + length > size:
            break
        append(pos)
        pos += 2 + length
    return tags


def _other_fields(data: bytes, pos: int) -> tuple[list[int], list[int], int] | None:
    """(starts, ends, sequence) of the fields from `pos` on, any length form; None when one is
    not an event or the sequence, or runs past the end."""
    starts: list[int] = []
    ends: list[int] = []
    sequence = 0
    size = len(data)
    while pos < size:
        tag = data[pos]
        if tag == _EVENTS_TAG:
            read = _varint(data, pos + 1)
            if read is None:
                return None
            length, start = read
            pos = start + length
            if pos > size:
                return None
            starts.append(start)
            ends.append(pos)
        elif tag == _SEQUENCE_TAG:
            read = _varint(data, pos + 1)
            if read is None:
                return None
            value, pos = read
            sequence = value - (1 << 64) if value >= 1 << 63 else value  # int64; the last wins
        else:
            return None
    return starts, ends, sequence


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it) of the varint at `pos`; None when truncated, longer than
    needed (protobuf may refuse some of those, so it decides) or past 64 bits."""
    value = 0
    for k in range(10):
        if pos + k >= len(data):
            return None
        byte = data[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if byte < 0x80:
            if (byte == 0 and k > 0) or value >= 1 << 64:
                return None
            return value, pos + k + 1
    return None


def _varint_size(values: np.ndarray) -> np.ndarray:
    """Bytes of the shortest varint of each value (int64 taken as its uint64 two's complement)."""
    return np.searchsorted(_VARINT_STEPS, values.view(np.uint64), side="right") + 1


def _canonical(columns: ViewEventColumns, sizes: np.ndarray) -> np.ndarray:
    """Rows whose bytes are exactly protobuf's serialization of the decoded fields.

    Every field the decoder took is in ascending order, once, with a one-byte tag; so the bytes
    are protobuf's own exactly when they are as short as its encoding of the values: no default
    value written out, no over-long varint or length. Negative values are left to protobuf (an
    int32 varint may hold bits protobuf drops, which this size comparison could not see).
    """
    c = columns
    id_bytes = np.fromiter(map(len, c.event_id), np.int64, len(c))
    time_bytes = (c.seconds != 0) * (1 + _varint_size(c.seconds)) + (c.nanos != 0) * (
        1 + _varint_size(c.nanos)
    )
    expected = (
        (id_bytes > 0) * (1 + _varint_size(id_bytes) + id_bytes)
        + (c.media_id != 0) * (1 + _varint_size(c.media_id))
        + (c.user_id != 0) * (1 + _varint_size(c.user_id))
        + (c.event_type != 0) * (1 + _varint_size(c.event_type))
        + c.has_time * (1 + _varint_size(time_bytes) + time_bytes)
    )
    non_negative = (
        (c.media_id >= 0)
        & (c.user_id >= 0)
        & (c.event_type >= 0)
        & (c.seconds >= 0)
        & (c.nanos >= 0)
    )
    return c.fast & non_negative & (expected == sizes)


def scan_upload_request(data: bytes) -> ScannedRequest | None:
    """The request's events without a message each, or None: let protobuf parse the request
    (its top level is not in the plain form, or an event is not valid protobuf)."""
    split = split_upload_request(data)
    if split is None:
        return None
    starts, ends, sequence = split
    columns = decode_view_event_spans(data, starts, ends)
    canonical = _canonical(columns, ends - starts)
    scanned = ScannedRequest(data, starts, ends, sequence, columns, canonical)
    for index in np.flatnonzero(~canonical).tolist():
        try:
            scanned.message(index)
        except DecodeError:
            return None
    return scanned
