"""The sparse stored forms (key_layout): minute lists for presence, sparse hour rows. Values
round-trip against plain sets and arrays; a store holding old full forms, new sparse forms and
pruned forms side by side answers trends, viewers and rankings as brute force says."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stats_service import aggregation
from stats_service import key_layout as k
from stats_service.processor import StatsProcessor
from stats_service.reader import StatsReader
from stats_service.rollups import BucketVersions, RollupCache
from stats_service.top_media import RollupRanker
from tests.support.stats_state import (
    BASE,
    HEARTBEAT,
    Brute,
    Event,
    load,
    partition,
    random_events,
)
from tests.unit.stats_service.test_minute_retention import PrunedBrute
from viewevents.state.store import StateStore

DAY, HOUR, MINUTE = 86_400, 3_600, 60
PARTS = [0, 1, 2]
DENSE_FROM = BASE + 50 * HOUR  # inside the random events' span (about 75 hours), on day 2
SWITCH_AT = BASE + 30 * HOUR  # events from here on are written in the new forms


def _bitmap(minutes: set[int]) -> np.ndarray:
    """A packed 1440-bit bitmap, built bit by bit (independent of the code under test)."""
    value = sum(1 << m for m in minutes)
    return np.frombuffer(value.to_bytes(k.BITMAP_BYTES, "little"), np.uint8)


def _minutes(bitmap: np.ndarray) -> set[int]:
    value = int.from_bytes(bitmap.tobytes(), "little")
    return {m for m in range(k.MINUTES_PER_DAY) if value >> m & 1}


def test_presence_values_round_trip_in_the_shorter_form() -> None:
    rng = random.Random(3)
    sets = [set(rng.sample(range(1440), n)) for n in (1, 2, 30, 89, 90, 91, 700, 1440)]
    sets += [{0}, {1439}, {7, 8, 15, 16}]
    values = k.presence_values(np.stack([_bitmap(s) for s in sets]))
    for minutes, value in zip(sets, values):
        if len(minutes) <= 89:  # a minute list: two bytes a minute, ascending
            assert value == b"".join(m.to_bytes(2, "little") for m in sorted(minutes))
        else:
            assert value == _bitmap(minutes).tobytes()
        assert k.minute_set(value) == sum(1 << m for m in minutes)
    old = [_bitmap(s).tobytes() for s in sets]  # stores written before: always bitmaps
    mask = (1 << 5 | 1 << 23).to_bytes(3, "little")  # a pruned day: hours 5 and 23
    mixed = [values[0], old[1], None, mask, values[4], old[3], values[2]]
    decoded = k.presence_bitmaps(mixed)
    hours = set(range(300, 360)) | set(range(1380, 1440))
    want = [sets[0], sets[1], set(), hours, sets[4], sets[3], sets[2]]
    assert [_minutes(row) for row in decoded] == want
    present = [v for v in mixed if v is not None]
    assert [_minutes(row) for row in k.minute_bitmaps(present)] == [
        sets[0],
        sets[1],
        hours,
        sets[4],
        sets[3],
        sets[2],
    ]
    # Pruning a day gives the same hour masks from either form.
    assert k.hour_mask_values(values) == k.hour_mask_values(old)


def _hour_row(rng: random.Random, active: int) -> np.ndarray:
    row = np.zeros(1, k.HOUR_ROW)
    row["hour"] = [rng.randint(1, 10**9) for _ in range(k.BUCKET_FIELDS)]
    for slot in rng.sample(range(60), active):
        row["minutes"][0, slot] = [rng.randint(0, 2**31 - 1) for _ in range(4)] + [1]
    return row


def test_hour_rows_round_trip_in_the_shorter_form() -> None:
    rng = random.Random(4)
    actives = [1, 2, 17, 57, 58, 59, 60]
    rows = np.concatenate([_hour_row(rng, n) for n in actives])
    values = k.hour_row_values(rows)
    for active, value in zip(actives, values):
        assert len(value) == (40 + 21 * active if active <= 57 else 1240)
    decoded, pruned = k.hour_rows_and_pruned(values)
    assert not pruned.any()
    assert decoded.tobytes() == rows.tobytes()
    # Mixed with the forms of older stores (full rows), absent and pruned rows.
    full = k.values_of_records(rows)
    mixed = [full[0], None, values[1], values[0][:40], values[6], full[2], values[3]]
    decoded, pruned = k.hour_rows_and_pruned(mixed)
    assert pruned.tolist() == [False, False, False, True, False, False, False]
    expect = np.zeros(len(mixed), k.HOUR_ROW)
    for i, source in {0: 0, 2: 1, 4: 6, 5: 2, 6: 3}.items():
        expect[i] = rows[source]
    expect["hour"][3] = rows["hour"][0]
    assert decoded.tobytes() == expect.tobytes()
    assert k.hour_rows_from_values(mixed).tobytes() == expect.tobytes()


def _dense_events(first_id: int) -> list[Event]:
    """Two items watched by three users every few seconds for hours: hour rows with more
    than 57 active minutes and viewer-days with more than 89 (the full forms)."""
    rng = random.Random(first_id)
    out = []
    start = DENSE_FROM
    for i in range(6000):
        seconds = start + 3 * i + rng.randint(0, 2)
        out.append(Event(f"d{first_id + i}", rng.randint(1, 2), rng.randint(1, 3), 2, seconds))
    return out


def _full_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the processor write the forms of stores from before the sparse ones."""
    monkeypatch.setattr(k, "hour_row_values", k.values_of_records)
    monkeypatch.setattr(
        aggregation,
        "presence_values",
        lambda bitmaps: [np.ascontiguousarray(b).tobytes() for b in bitmaps],
    )


@pytest.mark.parametrize("retention_days", [0, 1])
def test_old_and_new_forms_mixed_in_one_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retention_days: int
) -> None:
    rng = random.Random(11 + retention_days)
    events = random_events(rng, 6000, late_fraction=0.1)
    events = sorted(events + _dense_events(0), key=lambda e: e.seconds)
    late = random_events(random.Random(5), 600, late_fraction=1.0)  # hours to weeks behind
    for i, e in enumerate(late):  # among the others: old days change after the switch
        events.insert(rng.randrange(len(events)), replace(e, event_id=f"late{i}"))
    partitioned = partition(events, len(PARTS))
    store = StateStore(str(tmp_path / "db"))
    versions = BucketVersions()
    processor = StatsProcessor(HEARTBEAT, 0, versions, minute_retention_days=retention_days)
    # Up to the switch the full forms (as older stores hold), then the new ones: with the
    # retention, days 0 and 1 are pruned after the switch, holding both forms then.
    switch = {
        p: next(i for i, e in enumerate(evs) if e.seconds >= SWITCH_AT)
        for p, evs in partitioned.items()
    }
    halves = [{p: evs[: switch[p]] for p, evs in partitioned.items()}]
    halves.append({p: evs[switch[p] :] for p, evs in partitioned.items()})
    with monkeypatch.context() as patch:
        _full_forms(patch)
        load(store, halves[0], rng, processor=processor)
    load(store, halves[1], rng, processor=processor)  # rewrites some rows in the new forms

    lengths: dict[bytes, set[int]] = {kind: set() for kind in (b"H", b"P", b"Q")}
    cut = {
        p: (max(e.seconds for e in evs) - retention_days * DAY) // DAY * DAY
        for p, evs in partitioned.items()
    }
    for key, value in store.scan(b"\x00", b"\xff"):
        if key[2:3] in lengths:
            lengths[key[2:3]].add(len(value))
        if retention_days and key[2:3] == b"Q" and k.unbiased(key[3:11]) < cut[key[1]]:
            assert len(value) == 3  # a pruned day keeps hour masks only, whatever the form was
    for kind in (b"P", b"Q"):
        assert 180 in lengths[kind] and any(n % 2 == 0 and n < 180 for n in lengths[kind])
        assert (3 in lengths[kind]) == bool(retention_days)
    assert 1240 in lengths[b"H"] and any((n - 40) % 21 == 0 and n > 40 for n in lengths[b"H"])
    assert (40 in lengths[b"H"]) == bool(retention_days)

    reader = StatsReader(store)
    ranker = RollupRanker(store, RollupCache(versions, 64 << 20))
    brute = PrunedBrute(partitioned) if retention_days else None
    full = Brute(partitioned, retention_days * DAY)
    low = min(e.seconds for e in events)
    high = max(e.seconds for e in events)
    dense_hours = [DENSE_FROM + h * HOUR for h in range(5)]
    for i in range(24):
        at = rng.choice(dense_hours) if i % 3 == 0 else rng.randint(low, high)
        start = at // MINUTE * MINUTE - MINUTE * rng.randint(0, 90)
        end = start + MINUTE * rng.choice([1, 13, 59, 61, 600, 1441])
        media = rng.choice([1, 2, *sorted(full.totals)])
        if brute is None:
            expected = full.top(start, end)
            minutes = full.trend(media, MINUTE, start, end)
        else:
            expected = brute.top(start, end)
            minutes = brute.minute_trend(media, start, end)
        assert reader.trend(PARTS, media, MINUTE, start, end) == minutes
        hour_start = start // HOUR * HOUR
        assert reader.trend(PARTS, media, HOUR, hour_start, hour_start + 30 * HOUR) == (
            full.trend(media, HOUR, hour_start, hour_start + 30 * HOUR)
        )
        assert reader.viewers(PARTS, media, start, end) == expected.get(media, (0, 0, 0))[2]
        viewers = reader.range_viewers_all(PARTS, start, end)
        counts = reader.range_counts(PARTS, start, end)
        assert {m: (*counts[m], viewers[m]) for m in counts} == expected
        ranking = ranker.top(PARTS, start, end, 2, 1000)
        got = dict(zip(ranking.media, ranking.values[:, 2].tolist()))
        assert got == {m: v[2] for m, v in expected.items()}
    store.close()
