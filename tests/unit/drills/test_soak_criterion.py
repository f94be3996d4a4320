"""The soak's two measures: growth since the warm-up, and growth into the second half after it
(a slow leak the first measure's slack hides)."""

from __future__ import annotations

import pytest

from drills.soak import flatness, kept_up


def test_a_leak_fails_and_caches_filling_early_pass() -> None:
    leak = [100.0 + 8 * minute for minute in range(10)]  # 8 MiB a minute, never levelling off
    judged = flatness(leak, 2)
    assert (judged.at_warmup, judged.first_half, judged.second_half) == (108, 140, 172)
    assert judged.growth > 0.15
    filling = [100.0, 120, 140, 170, 180, 182, 179, 183, 181, 180]  # a bounded cache fills
    judged = flatness(filling, 2)
    assert judged.growth < 0.02 and judged.since_warmup > 0.25


def test_a_late_spike_counts() -> None:
    judged = flatness([100.0, 110, 112, 111, 113, 110, 150], 2)
    assert (judged.first_half, judged.second_half) == (112, 150)
    assert judged.growth > 0.15


def test_too_few_minutes_after_the_warm_up() -> None:
    with pytest.raises(ValueError):
        flatness([100.0, 110, 120], 2)


def test_a_consumer_more_than_a_minute_behind_fails_the_soak() -> None:
    assert kept_up({"stats": 0, "recommender": 12_000}, rate=1_000) == []
    problems = kept_up({"stats": 0, "recommender": 372_707, "other": None}, rate=3_000)
    assert len(problems) == 1 and problems[0].startswith("recommender fell behind: 372,707")
