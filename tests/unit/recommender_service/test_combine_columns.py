"""combine_columns (the consumer's decoded columns) equals combine_batch on the protobuf
messages of the same events: same users in the same order, same items, counts and orders."""

from __future__ import annotations

import random

import numpy as np
import pytest

from recommender_service.incremental import combine_batch, combine_columns
from tests.support.data import EVENT_TYPES
from viewevents.v1 import view_event_pb2 as ve


@pytest.mark.parametrize("seed", range(20))
def test_columns_combine_like_messages(seed: int) -> None:
    rng = random.Random(seed)
    events = [
        ve.ViewEvent(
            event_id=str(i),
            user_id=rng.randint(1, 12),
            media_id=rng.randint(1, 9),
            event_type=rng.choice(EVENT_TYPES),
        )
        for i in range(rng.randint(0, 300))
    ]
    parsed = [ve.ViewEvent.FromString(e.SerializeToString()) for e in events]
    expected = combine_batch(parsed)
    got = combine_columns(
        *(
            np.array([getattr(e, name) for e in events], np.int64)
            for name in ("user_id", "media_id", "event_type")
        )
    )
    assert got == expected
    assert [list(touched.items()) for touched in got[0].values()] == [
        list(touched.items()) for touched in expected[0].values()
    ]
    assert list(got[0]) == list(expected[0])
