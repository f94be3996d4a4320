"""Validation of single events: a table of good and bad events with the expected violations."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.validation import Limits, validate_event
from viewevents.v1 import view_event_pb2 as ve

NOW = 1_750_000_000
LIMITS = Limits(max_future_skew_seconds=300, max_event_age_seconds=30 * 86400)


def event(**fields: object) -> ve.ViewEvent:
    base: dict[str, object] = dict(
        event_id="e1",
        media_id=7,
        user_id=9,
        event_type=ve.EVENT_TYPE_WAYPOINT,
        event_time=Timestamp(seconds=NOW - 60),
    )
    base.update(fields)
    if base["event_time"] is None:
        del base["event_time"]
    return ve.ViewEvent(**base)  # type: ignore[arg-type]


CASES = [
    ("valid waypoint", event(), []),
    ("valid start", event(event_type=ve.EVENT_TYPE_STREAM_START), []),
    ("valid stop", event(event_type=ve.EVENT_TYPE_STREAM_STOP), []),
    ("valid end", event(event_type=ve.EVENT_TYPE_STREAM_END), []),
    ("just inside future skew", event(event_time=Timestamp(seconds=NOW + 300)), []),
    ("just inside max age", event(event_time=Timestamp(seconds=NOW - 30 * 86400)), []),
    ("missing event id", event(event_id=""), [("event_id", "REQUIRED")]),
    ("event id too long", event(event_id="x" * 257), [("event_id", "TOO_LONG")]),
    ("media id zero", event(media_id=0), [("media_id", "REQUIRED")]),
    ("media id negative", event(media_id=-4), [("media_id", "NOT_POSITIVE")]),
    ("user id negative", event(user_id=-1), [("user_id", "NOT_POSITIVE")]),
    ("type unspecified", event(event_type=ve.EVENT_TYPE_UNSPECIFIED), [("event_type", "REQUIRED")]),
    ("type unknown number", event(event_type=9), [("event_type", "UNKNOWN_VALUE")]),
    ("time missing", event(event_time=None), [("event_time", "REQUIRED")]),
    (
        "time in future",
        event(event_time=Timestamp(seconds=NOW + 301)),
        [("event_time", "IN_FUTURE")],
    ),
    (
        "time too old",
        event(event_time=Timestamp(seconds=NOW - 30 * 86400 - 1)),
        [("event_time", "TOO_OLD")],
    ),
    (
        "negative nanos",
        event(event_time=Timestamp(seconds=NOW, nanos=-5)),
        [("event_time", "OUT_OF_RANGE")],
    ),
    (
        "nanos of a whole second",
        event(event_time=Timestamp(seconds=NOW, nanos=1_000_000_000)),
        [("event_time", "OUT_OF_RANGE")],
    ),
    (
        "everything wrong",
        ve.ViewEvent(),
        [
            ("event_id", "REQUIRED"),
            ("media_id", "REQUIRED"),
            ("user_id", "REQUIRED"),
            ("event_type", "REQUIRED"),
            ("event_time", "REQUIRED"),
        ],
    ),
]


@pytest.mark.parametrize("name,candidate,expected", CASES, ids=[c[0] for c in CASES])
def test_violations(name: str, candidate: ve.ViewEvent, expected: list[tuple[str, str]]) -> None:
    violations = validate_event(candidate, NOW, LIMITS)
    assert [(v.field, v.reason) for v in violations] == expected
    for violation in violations:
        assert violation.description.startswith(violation.field + " "), violation.description


def test_descriptions_say_what_is_wrong() -> None:
    [future] = validate_event(event(event_time=Timestamp(seconds=NOW + 3600)), NOW, LIMITS)
    assert "3600 s in the future" in future.description and "300 s" in future.description
    [negative] = validate_event(event(media_id=-4), NOW, LIMITS)
    assert "got -4" in negative.description
