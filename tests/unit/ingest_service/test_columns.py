"""The per-request fast paths against independent computations: aiokafka's own murmur2 for the
partitions, and the per-event `validate_event` for the validity pre-check."""

from __future__ import annotations

import random
from typing import cast

import numpy as np
from aiokafka.partitioner import murmur2
from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.columns import murmur2_partitions, surely_valid
from ingest_service.validation import Limits, validate_event
from viewevents.v1 import view_event_pb2 as ve

NOW = 1_750_000_000
LIMITS = Limits(
    max_future_skew_seconds=300, max_event_age_seconds=30 * 86400, max_event_id_bytes=16
)


def test_partitions_match_kafkas_murmur2_for_every_key_length() -> None:
    rng = random.Random(3)
    keys = [str(rng.randrange(10 ** rng.randint(0, 19))).encode() for _ in range(3000)]
    keys += [b"", b"a", b"ab", b"abc", b"abcd", bytes(range(256)), "é✓".encode()]
    for partitions in (1, 4, 7, 12):
        expected = [(murmur2(key) & 0x7FFFFFFF) % partitions for key in keys]
        assert murmur2_partitions(keys, partitions).tolist() == expected


def test_no_keys() -> None:
    assert murmur2_partitions([], 4).tolist() == []


def _random_event(rng: random.Random) -> ve.ViewEvent:
    event = ve.ViewEvent(
        event_id=rng.choice(["", "e", "x" * 4, "x" * 5, "é" * 4, "✓" * 6, "y" * 17]),
        media_id=rng.choice([-1, 0, 1, 7, 2**62]),
        user_id=rng.choice([-5, 0, 1, 9]),
        # Wire ints, named by the enum or not (5, 99): the stubs type the field as the enum.
        event_type=cast(ve.EventType, rng.choice([0, 1, 2, 3, 4, 5, 99])),
    )
    if rng.random() < 0.9:
        offset = rng.choice(
            [
                0,
                1,
                60,
                299,
                300,
                301,
                302,
                -30 * 86400,
                -30 * 86400 - 1,
                -30 * 86400 + 1,
                -30 * 86400 + 3,
                -86400,
            ]
        )
        event.event_time.CopyFrom(
            Timestamp(seconds=NOW + offset, nanos=rng.choice([0, 1, 999_999_999, 500_000_000]))
        )
    return event


def test_surely_valid_only_vouches_for_events_validate_event_accepts() -> None:
    rng = random.Random(11)
    events = [_random_event(rng) for _ in range(5000)]
    mask, users = surely_valid(events, NOW, LIMITS)
    valid = [not validate_event(e, NOW, LIMITS) for e in events]
    assert all(valid[i] for i in np.flatnonzero(mask))
    assert users.tolist() == [e.user_id for e in events]
    # The common shapes are vouched for (the fast path is taken), boundary cases are not.
    assert 0 < mask.sum() < sum(valid)


def test_surely_valid_takes_a_plain_valid_batch_whole() -> None:
    events = [
        ve.ViewEvent(
            event_id=f"e{n}",
            media_id=n + 1,
            user_id=n + 2,
            event_type=ve.EVENT_TYPE_WAYPOINT,
            event_time=Timestamp(seconds=NOW - n),
        )
        for n in range(100)
    ]
    mask, _ = surely_valid(events, NOW, LIMITS)
    assert mask.all()
