"""Per-request (not per-event) work of the ingest hot path: a vectorized validity pre-check and
Kafka's murmur2 partitioner over all keys of a request at once.

Both are pure. `surely_valid` is only a sufficient condition: an event it passes is one that
`validation.validate_event` accepts; every other event takes the exact per-event path, which
alone words the violations. So the fast path cannot change what is accepted or rejected.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from ingest_service.validation import KNOWN_EVENT_TYPES, Limits

_SEED = np.uint32(0x9747B28C)
_M = np.uint32(0x5BD1E995)
_KNOWN_TYPES = np.array(sorted(KNOWN_EVENT_TYPES), np.int64)
_MEDIA = operator.attrgetter("media_id")
_USER = operator.attrgetter("user_id")
_TYPE = operator.attrgetter("event_type")
_EVENT_ID = operator.attrgetter("event_id")
_HAS_TIME = operator.methodcaller("HasField", "event_time")
_TIME = operator.attrgetter("event_time")
_SECONDS = operator.attrgetter("seconds")
_NANOS = operator.attrgetter("nanos")
# Events this close to a time limit take the exact path, so float rounding never matters here.
_MARGIN_SECONDS = 2.0


def surely_valid(
    events: Sequence[object], now_seconds: float, limits: Limits
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, user_ids): mask[i] means events[i] has no violation; False means "check it one by
    one" (it may still be valid). user_ids are the events' user ids as int64."""
    count = len(events)
    users = np.fromiter(map(_USER, events), np.int64, count)
    times = list(map(_TIME, events))
    mask = surely_valid_columns(
        media=np.fromiter(map(_MEDIA, events), np.int64, count),
        users=users,
        kinds=np.fromiter(map(_TYPE, events), np.int64, count),
        id_chars=np.fromiter(map(len, map(_EVENT_ID, events)), np.int64, count),
        has_time=np.fromiter(map(_HAS_TIME, events), bool, count),
        seconds=np.fromiter(map(_SECONDS, times), np.int64, count),
        nanos=np.fromiter(map(_NANOS, times), np.int64, count),
        now_seconds=now_seconds,
        limits=limits,
    )
    return mask, users


def surely_valid_columns(
    *,
    media: np.ndarray,
    users: np.ndarray,
    kinds: np.ndarray,
    id_chars: np.ndarray,
    has_time: np.ndarray,
    seconds: np.ndarray,
    nanos: np.ndarray,
    now_seconds: float,
    limits: Limits,
) -> np.ndarray:
    """`surely_valid`'s mask from the events' fields as int64 columns (id_chars: the event id's
    length in characters), however they were read: message attributes or the wire bytes."""
    instant = seconds + nanos / 1e9
    return (
        (id_chars > 0)
        & (id_chars * 4 <= limits.max_event_id_bytes)  # any UTF-8 fits then
        & (media > 0)
        & (users > 0)
        & np.isin(kinds, _KNOWN_TYPES)
        & has_time
        & (nanos >= 0)
        & (nanos < 1_000_000_000)
        & (instant < now_seconds + limits.max_future_skew_seconds - _MARGIN_SECONDS)
        & (instant > now_seconds - limits.max_event_age_seconds + _MARGIN_SECONDS)
    )


def murmur2_partitions(keys: Sequence[bytes], partitions: int) -> np.ndarray:
    """Kafka's default partition of each key: (murmur2(key) & 0x7fffffff) % partitions, as the
    Java client (and aiokafka) compute it, for all keys in a few array passes."""
    count = len(keys)
    if count == 0:
        return np.zeros(0, np.int64)
    lengths = np.fromiter(map(len, keys), np.int64, count)
    whole_words = lengths // 4
    width = int(whole_words.max()) * 4 + 4  # room for the tail word of the longest key
    table = np.zeros((count, width), np.uint8)
    flat = np.frombuffer(b"".join(keys), np.uint8)
    rows = np.repeat(np.arange(count), lengths)
    starts = np.cumsum(lengths) - lengths
    table[rows, np.arange(len(flat)) - np.repeat(starts, lengths)] = flat
    words = table.view("<u4").astype(np.uint32)  # (count, width // 4), little-endian
    with np.errstate(over="ignore"):
        h = _SEED ^ lengths.astype(np.uint32)
        for i in range(width // 4 - 1):
            k = words[:, i] * _M
            k ^= k >> np.uint32(24)
            k *= _M
            h = np.where(whole_words > i, (h * _M) ^ k, h)
        tail = words[np.arange(count), whole_words]  # the 1-3 bytes past the whole words, or 0
        has_tail = (lengths % 4) > 0
        h = np.where(has_tail, (h ^ tail) * _M, h)
        h ^= h >> np.uint32(13)
        h *= _M
        h ^= h >> np.uint32(15)
    return ((h & np.uint32(0x7FFFFFFF)).astype(np.int64)) % partitions
