"""The scanned path of Upload requests (`raw_requests`) against the protobuf path it replaces,
on many random and hostile requests: the same parse failure, sequence and event count, the same
accepted records byte for byte, the same rejections with the same violations and messages."""

from __future__ import annotations

import random
from typing import cast

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.planning import from_messages, plan
from ingest_service.raw_requests import ScannedRequest, scan_upload_request
from ingest_service.servicer import IngestServicer
from ingest_service.validation import Limits
from viewevents.rpc.errors import Unparseable, lenient_parser
from viewevents.v1 import ingest_service_pb2 as pb
from viewevents.v1 import view_event_pb2 as ve

NOW = 1_750_000_000.25
LIMITS = [
    Limits(),
    Limits(
        max_future_skew_seconds=300,
        max_event_age_seconds=30 * 86400,
        max_event_id_bytes=16,
        max_record_bytes=60,
    ),
]
_parse = lenient_parser(pb.UploadRequest)


def _outcome(request: object, limits: Limits) -> tuple[object, ...]:
    """Everything the servicer does with a request, as comparable values."""
    if isinstance(request, Unparseable):
        return ("unparseable", request.describe())
    if isinstance(request, ScannedRequest):
        events = request.events(NOW, limits)
        sequence, count = request.sequence, len(request)
    else:
        assert isinstance(request, pb.UploadRequest)
        events = from_messages(request.events, NOW, limits)
        sequence, count = request.sequence, len(request.events)
    decided = plan(events, NOW, limits)
    rejected = {
        index: (
            [v.SerializeToString() for v in violations],
            events.message(index).SerializeToString(),
            events.message(index).user_id,
            events.message(index).event_id,
        )
        for index, violations in decided.problems.items()
    }
    return (sequence, count, decided.keys, decided.values, rejected)


def _check(data: bytes) -> bool:
    """Both paths agree on `data`; True when the scan (not protobuf) read the request."""
    scanned = IngestServicer._read(data)
    for limits in LIMITS:
        assert _outcome(scanned, limits) == _outcome(_parse(data), limits), data.hex()
    return isinstance(scanned, ScannedRequest)


# --- a hand-made encoder, so the bytes can be anything protobuf writers would never produce --


def _varint(value: int, padding: int = 0) -> bytes:
    """`value` (taken mod 2**64) as a varint, `padding` bytes longer than needed."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value or padding:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
        if not value:
            out += b"\x80" * (padding - 1) + b"\x00"
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _pad(rng: random.Random, chance: float = 0.05) -> int:
    return rng.choice([1, 2, 9]) if rng.random() < chance else 0


def _int_field(rng: random.Random, number: int, value: int) -> bytes:
    if value == 0 and rng.random() < 0.9:
        return b""
    wire = 0 if rng.random() > 0.02 else rng.choice([1, 2, 5])
    return _tag(number, wire) + _varint(value, _pad(rng))


def _len_field(
    rng: random.Random, number: int, payload: bytes, optional: bool = True, odd: float = 0.05
) -> bytes:
    if optional and not payload and rng.random() < 0.9:
        return b""
    wire = 2 if rng.random() > odd / 2 else 0
    return _tag(number, wire) + _varint(len(payload), _pad(rng, odd)) + payload


def _event_bytes(rng: random.Random) -> bytes:
    event_id = rng.choice(
        [b"", b"e1", b"bench-7-42", "é✓".encode(), b"\xff\xfe", b"x" * 17, b"y" * 70, b"z" * 300]
    )
    media = rng.choice([0, 1, 7, 10_000, -1, 2**63 - 1, 2**40, -(2**63)])
    user = rng.choice([0, 1, 4711, 200_000, -5, 2**62])
    kind = rng.choice([0, 1, 2, 3, 4, 5, 99, -1, 2**32 + 1, 0xFFFFFFFF, 2**31])
    parts = [
        _len_field(rng, 1, event_id),
        _int_field(rng, 2, media),
        _int_field(rng, 3, user),
        _int_field(rng, 4, kind),
    ]
    if rng.random() < 0.9:
        seconds = int(NOW) + rng.choice([0, -1, 1, 299, 302, -86400, -31 * 86400, -(10**10), 0])
        seconds = rng.choice([seconds, seconds, seconds, 0, -1, 2**40])
        nanos = rng.choice([0, 0, 5, 999_999_999, 1_000_000_000, -1, 2**32 + 3])
        inner = [_int_field(rng, 1, seconds), _int_field(rng, 2, nanos)]
        if rng.random() < 0.05:
            inner.append(_int_field(rng, 3, 1))  # unknown to Timestamp
        if rng.random() < 0.05:
            rng.shuffle(inner)
        parts.append(_len_field(rng, 5, b"".join(inner), optional=False))
    if rng.random() < 0.05:
        parts.append(
            rng.choice([_tag(6, 0) + b"\x01", _tag(15, 2) + b"\x01a", _tag(16, 0) + b"\x02"])
        )
    if rng.random() < 0.05:
        parts.append(rng.choice(parts))  # a field twice
    if rng.random() < 0.05:
        rng.shuffle(parts)
    return b"".join(parts)


def _request_bytes(rng: random.Random) -> bytes:
    parts = [
        _len_field(rng, 1, _event_bytes(rng), optional=False, odd=0.005)
        for _ in range(rng.choice([rng.randint(0, 3), rng.randint(0, 30)]))
    ]
    for _ in range(rng.choice([0, 0, 1, 2])):
        sequence = rng.choice([0, 3, 2**40, -1])
        parts.insert(rng.randint(0, len(parts)), _tag(2, 0) + _varint(sequence, _pad(rng)))
    if rng.random() < 0.03:
        parts.insert(rng.randint(0, len(parts)), _tag(3, 0) + b"\x01")  # unknown top-level field
    data = b"".join(parts)
    if data and rng.random() < 0.05:
        data = data[: rng.randrange(len(data))]  # truncated
    if data and rng.random() < 0.05:
        at = rng.randrange(len(data))
        data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]  # one byte changed
    return data


@pytest.mark.parametrize("seed", range(40))
def test_scanned_requests_are_handled_exactly_as_protobuf_parses_them(seed: int) -> None:
    rng = random.Random(seed)
    scanned = sum(_check(_request_bytes(rng)) for _ in range(100))
    assert scanned > 20  # the fast path itself is what was compared, most of the time


def test_random_bytes_are_handled_exactly_as_protobuf_parses_them() -> None:
    rng = random.Random(99)
    for _ in range(3000):
        _check(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))))
    for data in (b"", b"\x0a", b"\x0a\x00", b"\x0a\x05\x08", b"\x10", b"\x10\xff" * 6, b"\x0a\x80"):
        _check(data)


def test_what_protobuf_writers_produce_is_scanned_whole_and_kept_byte_for_byte() -> None:
    rng = random.Random(5)
    events = [
        ve.ViewEvent(
            event_id=f"bench-{n}" * rng.randint(1, 20),
            media_id=rng.randint(1, 2**40),
            user_id=rng.randint(1, 200_000),
            event_type=cast(ve.EventType, rng.randint(1, 4)),  # one of the four named types
            event_time=Timestamp(
                seconds=int(NOW) - rng.randint(0, 86400), nanos=rng.choice([0, 7])
            ),
        )
        for n in range(3000)
    ]
    data = pb.UploadRequest(events=events, sequence=12).SerializeToString()
    scanned = scan_upload_request(data)
    assert scanned is not None and bool(np.all(scanned.canonical))
    assert scanned.sequence == 12 and not scanned.parsed
    decided = plan(scanned.events(NOW, LIMITS[0]), NOW, LIMITS[0])
    assert decided.values == [e.SerializeToString() for e in events]
    assert decided.keys == [str(e.user_id).encode() for e in events]
    _check(data)
