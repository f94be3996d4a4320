"""An item's viewer-days read row by row (few rows) and with numpy (many) give the same users:
random bitmaps, pruned days' hour masks, and ranges cut anywhere on minute boundaries."""

from __future__ import annotations

import random

import numpy as np

from stats_service import key_layout as k
from stats_service.reader import _in_range, users_in_range

DAY = 86_400
BASE = 1_767_225_600  # 2026-01-01T00:00:00Z


def _rows(rng: random.Random, count: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(count):
        day = BASE + DAY * rng.randrange(4)
        key = k.presence_prefix(1, 7) + k.biased(day) + k.u64(rng.randrange(1, 40))
        if rng.random() < 0.3:  # a pruned day: one bit per hour
            value = rng.getrandbits(24).to_bytes(k.HOUR_MASK_BYTES, "little")
        else:  # a few minutes, sometimes none in a given hour
            bits = 0
            for _ in range(rng.randint(1, 5)):
                bits |= 1 << rng.randrange(k.MINUTES_PER_DAY)
            value = bits.to_bytes(k.BITMAP_BYTES, "little")
        out.append((key, value))
    return sorted(set(out))


def _by_numpy(items: list[tuple[bytes, bytes]], start: int, end: int) -> set[int]:
    if not items:
        return set()
    keys = [key for key, _ in items]
    day = (k.key_columns(keys, 1).astype(np.uint64) ^ np.uint64(k.BIAS)).astype(np.int64)
    inside = _in_range(day, [v for _, v in items], start, end)
    return set(k.key_columns(keys, 2)[inside].tolist())


def test_row_by_row_and_numpy_agree_on_every_range() -> None:
    rng = random.Random(11)
    for _ in range(300):
        items = _rows(rng, rng.randint(0, 60))
        start = BASE + 60 * rng.randrange(4 * 1440)
        end = start + 60 * rng.choice([1, 2, 59, 60, 61, 700, 1440, 1441, 3000, 6000])
        found = {int.from_bytes(u, "big") for u in users_in_range(items, start, end)}
        assert found == _by_numpy(items, start, end), (start, end)
