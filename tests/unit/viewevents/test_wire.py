"""The columnar ViewEvent decoder against protobuf's own parser of the same bytes."""

from __future__ import annotations

import random
from typing import cast

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from viewevents import wire
from viewevents.v1 import view_event_pb2 as ve
from viewevents.wire import decode_view_events


def _event(rng: random.Random) -> ve.ViewEvent:
    event = ve.ViewEvent(
        event_id=rng.choice(
            ["", "a", "ev-" + str(rng.randrange(10**12)), "é-id", "x" * 127, "x" * 128, "x" * 300]
        ),
        media_id=rng.choice([0, 1, 127, 128, 2**31, 2**62, -1, -(2**63)]),
        user_id=rng.choice([0, 5, 300, 16384, 2**40, -7]),
        # Wire ints, named by the enum or not (9, -3): the stubs type the field as the enum.
        event_type=cast(ve.EventType, rng.choice([0, 1, 2, 3, 4, 9, -3])),
    )
    if rng.random() < 0.8:
        event.event_time.CopyFrom(
            Timestamp(
                seconds=rng.choice([0, 1, 1_750_000_000, -5, 2**40]),
                nanos=rng.choice([0, 1, 999_999_999, -1]),
            )
        )
    return event


def _records(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    records = [_event(rng).SerializeToString() for _ in range(count)]
    mangled = []
    for record in records[: count // 3]:  # truncations, flipped bytes, appended fields
        data = bytearray(record)
        choice = rng.randrange(4)
        if choice == 0 and data:
            del data[rng.randrange(len(data)) :]
        elif choice == 1 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice == 2:
            data += bytes([0x10, 0x05])  # media_id again: legal, last one wins
        else:
            data += bytes([0x38, 0x01])  # an unknown field 7
        mangled.append(bytes(data))
    return records + mangled + [b"", b"\xff", b"\x0a\x05ab"]


def test_fast_rows_say_what_protobuf_says_and_the_rest_are_left_to_it() -> None:
    records = _records(5, 3000)
    columns = decode_view_events(records)
    fast_rows = 0
    for i, data in enumerate(records):
        try:
            parsed = ve.ViewEvent.FromString(data)
        except DecodeError:
            assert not columns.fast[i], f"record {i} is not protobuf yet decoded"
            continue
        if not columns.fast[i]:
            continue
        fast_rows += 1
        assert columns.event_id[i] == parsed.event_id.encode(), i
        assert columns.media_id[i] == parsed.media_id, i
        assert columns.user_id[i] == parsed.user_id, i
        assert columns.event_type[i] == parsed.event_type, i
        assert columns.has_time[i] == parsed.HasField("event_time"), i
        assert columns.seconds[i] == parsed.event_time.seconds, i
        assert columns.nanos[i] == parsed.event_time.nanos, i
    assert fast_rows > 2000  # canonical ASCII records take the fast path


def test_empty_batch() -> None:
    assert len(decode_view_events([])) == 0


def test_the_complete_layout_reads_what_the_general_scan_reads() -> None:
    """Records read field after field (every field set, in protobuf's order) hold what the
    general scan reads from the same bytes; records in any other layout are left to it."""
    records = _records(9, 3000)
    lengths = np.array([len(r) for r in records], np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buf = np.frombuffer(b"".join(records) + bytes(wire._PAD), np.uint8)
    complete = wire._complete(buf, starts, ends)
    general = wire._general(buf, starts, ends)
    rows = np.flatnonzero(complete.ok)
    assert len(rows) > 500  # the generator leaves many fields unset: those are not complete
    assert general.ok[rows].all()
    for name in wire._Found.__dataclass_fields__:
        assert (getattr(complete, name)[rows] == getattr(general, name)[rows]).all(), name
    # Rows the general scan reads with every field set and short lengths are all complete.
    everything = (
        general.ok
        & general.has_id
        & general.has_time
        & (general.id_length < 128)
        & (general.media_id != 0)
        & (general.user_id != 0)
        & (general.event_type != 0)
        & (general.seconds != 0)
    )
    assert complete.ok[everything].all()
