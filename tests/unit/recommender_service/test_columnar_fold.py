"""The recommender's columnar fold pieces against their one-at-a-time definitions: window and
item codecs, keys, the per-(user, item) combine, and the hot rows' commit rule."""

from __future__ import annotations

import random
import tempfile

import numpy as np
import pytest

from recommender_service import key_layout as keys
from recommender_service.hot_rows import HotRows, entry_bytes
from recommender_service.incremental import combine_arrays, combine_columns
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction


@pytest.mark.parametrize("seed", range(5))
def test_windows_decode_and_encode_like_one_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    values: list[bytes | None] = []
    for _ in range(100):
        roll = rng.random()
        if roll < 0.2:
            values.append(None)
        elif roll < 0.3:
            values.append(b"")  # a user seen without view time
        else:
            k = rng.randint(1, 12)
            media = [rng.randint(1, 2**40) for _ in range(k)]
            w = [rng.randint(1, 10**6) for _ in range(k)]
            values.append(keys.encode_window(media, w, rng.random() < 0.5))
    stored = keys.decode_windows(values)
    for k, value in enumerate(values):
        start, end = stored.starts[k], stored.starts[k] + stored.lengths[k]
        assert bool(stored.known[k]) == (value is not None)
        window = keys.decode_window(value or b"")
        assert tuple(stored.media[start:end]) == window[0]
        assert tuple(stored.w[start:end]) == window[1]
        assert bool(stored.has_evicted[k]) == window[2]
    written = [k for k, value in enumerate(values) if value]
    lengths = stored.lengths[written]
    starts = stored.starts[written]
    flat = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    encoded = keys.encode_windows(
        stored.has_evicted[written], lengths, stored.media[flat], stored.w[flat]
    )
    assert encoded == [values[k] for k in written]


def test_keys_and_item_records_in_bulk_match_one_at_a_time() -> None:
    users = np.array([1, 2**40 + 3, 2**63 - 1], dtype=np.int64)
    media = np.array([7, 2**33, 1], dtype=np.int64)
    assert keys.user_keys(3, users) == [keys.user_key(3, int(u)) for u in users]
    assert keys.item_keys(3, media) == [keys.item_key(3, int(m)) for m in media]
    assert keys.evicted_keys(3, users, media) == [
        keys.evicted_key(3, int(u), int(m)) for u, m in zip(users, media, strict=True)
    ]
    seqs = np.array([0, 1, 2**31], dtype=np.int64)
    assert keys.row_keys(3, media, seqs) == [
        keys.row_key(3, int(m), int(s)) for m, s in zip(media, seqs, strict=True)
    ]
    record = keys.ItemRecord(s=5, q=-(2**62), n=3, deltas=4, base_entries=9, delta_entries=2)
    decoded = keys.decode_items([record.encode(), None])
    assert keys.encode_items(decoded) == [record.encode(), keys.ItemRecord().encode()]
    assert keys.encode_many_counts(np.array([3, 2**60])) == [
        keys.encode_counts(3),
        keys.encode_counts(2**60),
    ]


@pytest.mark.parametrize("seed", range(10))
def test_combine_arrays_agrees_with_combine_columns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(0, 400))
    user = rng.integers(1, 15, size)
    media = rng.integers(1, 10, size)
    kind = rng.choice([1, 2, 2, 2, 3, 4], size)
    per_user, items = combine_columns(user, media, kind)
    raised = combine_arrays(user, media, kind)
    assert raised.users.tolist() == list(per_user)
    assert raised.items.tolist() == sorted(items)
    got: dict[int, list[tuple[int, int, int]]] = {u: [] for u in per_user}
    for k, m, c, last in zip(
        raised.user.tolist(),
        raised.media.tolist(),
        raised.count.tolist(),
        raised.last.tolist(),
        strict=True,
    ):
        got[int(raised.users[k])].append((last, m, c))
    for u, added in per_user.items():
        assert [(m, c) for _, m, c in sorted(got[u])] == list(added.items())


def test_hot_rows_hold_only_committed_values() -> None:
    store = StateStore(tempfile.mkdtemp())
    try:
        hot = HotRows(capacity=8)
        txn = Transaction(store)
        assert hot.get_many(txn, [b"a", b"b"]) == [None, None]
        txn.put(b"a", b"1")
        hot.stage([b"a"], [b"1"])
        # Not committed: the cache still says what the store has.
        assert hot.get_many(Transaction(store), [b"a"]) == [None]
        txn.commit()
        hot.committed()
        fresh = Transaction(store)
        assert hot.get_many(fresh, [b"a", b"b"]) == [b"1", None]
        assert hot.hits == 3 and hot.misses == 2
        for k in range(20):
            hot.stage([b"k%d" % k], [b"v"])
        hot.committed()
        assert len(hot) <= 8
    finally:
        store.close()


def test_hot_rows_are_bounded_by_bytes_as_well_as_keys() -> None:
    """User windows grow to 16 bytes per item: a key count alone does not bound the memory."""
    store = StateStore(tempfile.mkdtemp())
    try:
        budget = 20 * entry_bytes(b"k000", bytes(1_000))
        hot = HotRows(capacity=1_000, budget_bytes=budget)
        for k in range(100):  # big values: the byte bound, not the key count, must bite
            hot.stage([b"k%03d" % k], [bytes(1_000)])
            hot.committed()
            assert hot.bytes <= budget
        assert 0 < len(hot) <= 20
        assert hot.bytes == sum(entry_bytes(key, v) for key, v in hot._values.items())
        # Rewriting a cached key with a longer value is charged the difference.
        key = next(iter(hot._values))
        before = hot.bytes
        hot.stage([key], [bytes(1_500)])
        hot.committed()
        assert hot.bytes in (before + 500, sum(entry_bytes(k, v) for k, v in hot._values.items()))
        assert hot.bytes == sum(entry_bytes(k, v) for k, v in hot._values.items())
        # Misses read through a transaction are charged too (absent keys as their key alone).
        hot.get_many(Transaction(store), [b"absent-%d" % k for k in range(50)])
        assert hot.bytes <= budget
        assert hot.bytes == sum(entry_bytes(k, v) for k, v in hot._values.items())
    finally:
        store.close()
