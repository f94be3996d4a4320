"""The absence filter in front of the de-duplication reads: it never calls a stored id absent,
so duplicates are dropped exactly as without it (checked against a brute force over the same
stream, across restarts, rebuilds when full, and partitions where it is off)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from viewevents.consumer import SeenIds
from viewevents.state.absence import AbsenceFilter, filter_bytes, key_hashes
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction


@pytest.mark.parametrize("seed", range(3))
def test_no_false_absence_and_few_false_maybes(seed: int) -> None:
    rng = random.Random(seed)
    added = [rng.randbytes(rng.randint(1, 40)) for _ in range(20_000)]
    absence = AbsenceFilter(20_000)
    for start in range(0, len(added), 3_000):
        absence.add(key_hashes(added[start : start + 3_000]))
    assert absence.may_contain(key_hashes(added)).all()
    others = [b"other-%d" % i for i in range(20_000)]
    false_maybe = float(absence.may_contain(key_hashes(others)).mean())
    assert false_maybe < 0.03  # about 1 to 2 % at capacity with 10+ bits per key
    assert absence.full and not AbsenceFilter(20_001).full


def test_empty_filter_says_absent_for_everything() -> None:
    absence = AbsenceFilter(100)
    assert not absence.may_contain(key_hashes([b"a", b"b", b""])).any()
    assert absence.may_contain(np.zeros(0, np.uint64)).shape == (0,)


class Brute:
    """Which rows `keep_new_ids` must keep: first copy of an id in the stream, again when
    re-sent more than `retention` days after it was first seen (the same rule, no store)."""

    def __init__(self, retention: int) -> None:
        self.retention = retention
        self.first_seen: dict[tuple[int, bytes], int] = {}

    def keep(self, partition: int, ids: list[bytes], day: int) -> list[int]:
        rows: list[int] = []
        in_batch: set[bytes] = set()
        for row, event_id in enumerate(ids):
            if event_id in in_batch:
                continue
            in_batch.add(event_id)
            seen = self.first_seen.get((partition, event_id))
            if seen is None or day - seen > self.retention:
                self.first_seen[(partition, event_id)] = day
                rows.append(row)
        return rows


@pytest.mark.parametrize("capacity", [0, 40, 300, 100_000])
def test_seen_ids_with_the_filter_match_a_brute_force(tmp_path: Path, capacity: int) -> None:
    """Capacity 0: no filter; 40: off after its first rebuild (the store holds over 20 ids);
    300: rebuilt from the store when full, then off; 100,000: on throughout."""
    rng = random.Random(capacity)
    store = StateStore(str(tmp_path / "db"))
    seen = SeenIds(retention_days=1_000, filter_capacity=capacity)
    brute = Brute(1_000)
    pool = [b"id-%d" % i for i in range(600)]
    day = 100
    for batch in range(120):
        if batch in (40, 80):  # a restart: the filter is rebuilt from what the store holds
            seen = SeenIds(retention_days=1_000, filter_capacity=capacity)
        partition = rng.randrange(3)
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        ids += [b"new-%d-%d" % (batch, n) for n in range(rng.randint(0, 20))]
        rng.shuffle(ids)
        txn = Transaction(store)
        rows = seen.keep_new_ids(partition, ids, day, txn)
        txn.commit()
        assert rows == brute.keep(partition, ids, day), batch
    if capacity == 100_000:
        assert seen.reads_skipped > 0


def test_filter_survives_an_uncommitted_batch(tmp_path: Path) -> None:
    """Ids added to the filter by a batch that never committed (a crash in the same process is
    not possible, but an exception is) are read from the store, which says absent: kept."""
    store = StateStore(str(tmp_path / "db"))
    seen = SeenIds(retention_days=30, filter_capacity=1_000)
    lost = Transaction(store)
    assert seen.keep_new_ids(0, [b"a", b"b"], 10, lost) == [0, 1]  # never committed
    txn = Transaction(store)
    assert seen.keep_new_ids(0, [b"a", b"c"], 10, txn) == [0, 1]
    txn.commit()
    again = Transaction(store)
    assert seen.keep_new_ids(0, [b"c", b"a", b"d"], 10, again) == [2]


def test_filters_stay_within_their_budget_share_and_answers_stay_exact(tmp_path: Path) -> None:
    """A budget for two filters: the third partition goes without one (its reads are not
    skipped), every partition still drops exactly the brute force's duplicates."""
    store = StateStore(str(tmp_path / "db"))
    seen = SeenIds(30, filter_capacity=1_000, filter_budget_bytes=2 * filter_bytes(1_000))
    brute = Brute(30)
    for batch in range(30):
        partition = batch % 3
        ids = [b"id-%d" % (i % 50) for i in range(batch, batch + 20)]
        txn = Transaction(store)
        assert seen.keep_new_ids(partition, ids, 10, txn) == brute.keep(partition, ids, 10)
        txn.commit()
    filters = seen._filters
    assert [p for p, f in sorted(filters.items()) if f is not None] == [0, 1]
    assert filters[2] is None
    assert sum(f.nbytes for f in filters.values() if f is not None) <= 2 * filter_bytes(1_000)


def test_a_new_assignment_drops_the_filters_of_partitions_no_longer_owned(
    tmp_path: Path,
) -> None:
    store = StateStore(str(tmp_path / "db"))
    seen = SeenIds(30, filter_capacity=1_000, filter_budget_bytes=2 * filter_bytes(1_000))
    for partition in (0, 1):
        txn = Transaction(store)
        seen.keep_new_ids(partition, [b"a", b"b"], 10, txn)
        txn.commit()
    kept = seen._filters[1]
    seen.retain([1, 2])  # partition 0 moved away, 2 came
    assert set(seen._filters) == {1} and seen._filters[1] is kept  # kept, not rebuilt
    txn = Transaction(store)
    assert seen.keep_new_ids(2, [b"a", b"c"], 10, txn) == [0, 1]
    txn.commit()
    assert seen._filters[2] is not None  # room again for the new partition's filter
    seen.retain([1])
    seen.retain([0, 1])  # 0 comes back: rebuilt from the store, which says what it holds
    txn = Transaction(store)
    assert seen.keep_new_ids(0, [b"b", b"z"], 10, txn) == [1]
    txn.commit()
    assert seen._filters[0] is not None


def test_filter_bytes_are_known_before_the_filter_is_made() -> None:
    for capacity in (1, 7, 1_000, 1_000_000):
        assert filter_bytes(capacity) == AbsenceFilter(capacity).nbytes
