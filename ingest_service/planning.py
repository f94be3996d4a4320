"""What one request's events become, decided without I/O: the records for the view topic and
the field violations of the others, by index in the request.

The events arrive in two shapes: protobuf messages (Publish, and any request protobuf had to
parse) or a scanned serialized request (`raw_requests`). Both are reduced to `RequestEvents`,
so the decision itself (`plan`) is one piece of code whichever way the bytes were read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ingest_service.columns import surely_valid
from ingest_service.validation import Limits, validate_event, validate_record_size
from viewevents.v1 import view_event_pb2

ViewEvent = view_event_pb2.ViewEvent
FieldViolation = view_event_pb2.FieldViolation
_serialize = ViewEvent.SerializeToString


@dataclass
class RequestEvents:
    """One request's events as the hot path needs them."""

    values: list[bytes]  # each event's record value: its protobuf serialization
    users: np.ndarray  # int64 user ids (the record keys)
    surely: np.ndarray  # bool: certainly valid, so the per-event check is skipped
    message: Callable[[int], ViewEvent]  # event i as a message, for the exact check and DLQ

    def __len__(self) -> int:
        return len(self.values)


def from_messages(events: Sequence[ViewEvent], now_seconds: float, limits: Limits) -> RequestEvents:
    """`RequestEvents` of parsed messages: values re-serialized, fields read as attributes."""
    surely, users = surely_valid(events, now_seconds, limits)
    return RequestEvents(list(map(_serialize, events)), users, surely, events.__getitem__)


@dataclass
class Plan:
    """The accepted events' records, in request order, and every other event's violations."""

    keys: list[bytes]
    values: list[bytes]
    problems: dict[int, list[FieldViolation]]


def user_keys(users: np.ndarray) -> list[bytes]:
    """`viewevents.kafka.user_key` of each user id: its ASCII decimal digits."""
    return [str(user).encode() for user in users.tolist()]


def plan(events: RequestEvents, now_seconds: float, limits: Limits) -> Plan:
    """Validate a request's events: the pre-check vouches for most at once, the others are
    validated one by one (which alone words violations); then every record must fit Kafka."""
    keys = user_keys(events.users)
    values = events.values
    problems: dict[int, list[FieldViolation]] = {}
    for index in np.flatnonzero(~events.surely).tolist():
        violations = validate_event(events.message(index), now_seconds, limits)
        if violations:
            problems[index] = violations
    sizes = np.fromiter(map(len, keys), np.int64, len(keys)) + np.fromiter(
        map(len, values), np.int64, len(values)
    )
    for index in np.flatnonzero(sizes > limits.max_record_bytes).tolist():
        if index not in problems:
            too_large = validate_record_size(len(keys[index]), len(values[index]), limits)
            assert too_large is not None
            problems[index] = [too_large]
    if problems:
        kept = [i for i in range(len(values)) if i not in problems]
        keys = [keys[i] for i in kept]
        values = [values[i] for i in kept]
    return Plan(keys, values, problems)
