"""Unit tests for viewevents_client.event_files: which lines become events, which are rejected client-side.

Expected values are written out by hand (epoch seconds computed independently below), so a
wrong conversion in the parser cannot also be "expected" by the test.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from viewevents.v1 import view_event_pb2 as pb
from viewevents_client.event_files import ParsedLine, iter_file, parse_line, to_legacy_dict

T0 = 1_709_294_400  # 2024-03-01T12:00:00Z, checked in test_reference_epoch
START, WAYPOINT, STOP, END = (
    pb.EVENT_TYPE_STREAM_START,
    pb.EVENT_TYPE_WAYPOINT,
    pb.EVENT_TYPE_STREAM_STOP,
    pb.EVENT_TYPE_STREAM_END,
)


def test_reference_epoch() -> None:
    """T0 really is 2024-03-01T12:00:00Z (so the table below is self-consistent)."""
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0)) == "2024-03-01T12:00:00"


def legacy(**overrides: Any) -> str:
    """A complete legacy line with some keys replaced (None value = key removed)."""
    d: dict[str, Any] = {
        "EventId": "e-1",
        "MediaId": 12,
        "UserId": 7,
        "Timestamp": T0,
        "DateTime": "2024-03-01T12:00:00Z",
        "EventType": "waypoint",
    }
    for key, value in overrides.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return json.dumps(d)


def event(
    event_id: str = "e-1",
    media_id: int = 12,
    user_id: int = 7,
    event_type: pb.EventType = WAYPOINT,
    seconds: int | None = T0,
    nanos: int = 0,
) -> pb.ViewEvent:
    e = pb.ViewEvent(event_id=event_id, media_id=media_id, user_id=user_id, event_type=event_type)
    if seconds is not None:
        e.event_time.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
    return e


GOOD: list[tuple[str, str, pb.ViewEvent]] = [
    ("complete legacy line", legacy(), event()),
    ("streamstart", legacy(EventType="streamstart"), event(event_type=START)),
    ("StreamStart mixed case", legacy(EventType="StreamStart"), event(event_type=START)),
    ("WAYPOINT upper case", legacy(EventType="WAYPOINT"), event(event_type=WAYPOINT)),
    ("streamStop", legacy(EventType="streamStop"), event(event_type=STOP)),
    ("StreamEnd", legacy(EventType="StreamEnd"), event(event_type=END)),
    (
        "numeric strings for ids",
        legacy(MediaId="42", UserId="0099"),
        event(media_id=42, user_id=99),
    ),
    ("integral float id", legacy(MediaId=12.0), event(media_id=12)),
    ("negative id is representable", legacy(UserId=-3), event(user_id=-3)),
    ("zero id is representable", legacy(MediaId=0), event(media_id=0)),
    ("int64 max", legacy(UserId=2**63 - 1), event(user_id=2**63 - 1)),
    ("int64 min", legacy(UserId=-(2**63)), event(user_id=-(2**63))),
    ("DateTime with offset", legacy(DateTime="2024-03-01T13:30:00+01:30"), event()),
    ("naive DateTime is UTC", legacy(DateTime="2024-03-01T12:00:00"), event()),
    ("DateTime only", legacy(Timestamp=None), event()),
    (
        "DateTime only, other day",
        legacy(Timestamp=None, DateTime="2024-03-02T12:00:05Z"),
        event(seconds=T0 + 86_400 + 5),
    ),
    ("Timestamp only", legacy(DateTime=None, Timestamp=T0 + 61), event(seconds=T0 + 61)),
    (
        "float Timestamp only",
        legacy(DateTime=None, Timestamp=T0 + 0.25),
        event(nanos=250_000_000),
    ),
    (
        "float Timestamp rounded to microseconds",
        legacy(DateTime=None, Timestamp=1709294400.123),
        event(nanos=123_000_000),
    ),
    ("Timestamp as string", legacy(DateTime=None, Timestamp=str(T0 + 3)), event(seconds=T0 + 3)),
    (
        "DateTime wins within tolerance (+1 s exactly)",
        legacy(Timestamp=T0 + 1),
        event(),
    ),
    ("DateTime wins within tolerance (-1 s exactly)", legacy(Timestamp=T0 - 1), event()),
    (
        "DateTime wins within tolerance (fractions)",
        legacy(Timestamp=T0 + 0.4, DateTime="2024-03-01T12:00:01.3Z"),
        event(seconds=T0 + 1, nanos=300_000_000),
    ),
    (
        "nanosecond DateTime",
        legacy(Timestamp=None, DateTime="2024-03-01T12:00:00.123456789Z"),
        event(nanos=123_456_789),
    ),
    (
        "millisecond DateTime with offset",
        legacy(Timestamp=None, DateTime="2024-03-01T11:00:00.5-01:00"),
        event(nanos=500_000_000),
    ),
    (
        "before 1970",
        legacy(Timestamp=None, DateTime="1969-12-31T23:59:59.5Z"),
        event(seconds=-1, nanos=500_000_000),
    ),
    ("missing EventId -> default", legacy(EventId=None), event(event_id="")),
    ("missing MediaId -> default", legacy(MediaId=None), event(media_id=0)),
    ("missing UserId -> default", legacy(UserId=None), event(user_id=0)),
    (
        "missing EventType -> UNSPECIFIED",
        legacy(EventType=None),
        event(event_type=pb.EVENT_TYPE_UNSPECIFIED),
    ),
    ("missing time -> unset", legacy(Timestamp=None, DateTime=None), event(seconds=None)),
    ("only one legacy key", '{"EventId": "x"}', pb.ViewEvent(event_id="x")),
    ("null means missing", legacy(MediaId=None)[:-1] + ', "MediaId": null}', event(media_id=0)),
    ("unknown keys ignored", legacy()[:-1] + ', "Player": "web", "eventId": "no"}', event()),
    (
        "grpcurl protobuf JSON",
        (
            '{"eventId": "p-1", "mediaId": "12", "userId": "7", "eventType": "EVENT_TYPE_WAYPOINT",'
            ' "eventTime": "2024-03-01T12:00:00Z"}'
        ),
        event(event_id="p-1"),
    ),
    (
        "protobuf JSON, snake_case and numbers",
        (
            '{"event_id": "p-2", "media_id": 12, "user_id": 7, "event_type": "EVENT_TYPE_STREAM_END",'
            ' "event_time": "2024-03-01T13:00:00.5+01:00"}'
        ),
        event(event_id="p-2", event_type=END, nanos=500_000_000),
    ),
    (
        "protobuf JSON, missing fields and an unknown key",
        '{"mediaId": "5", "extra": true}',
        pb.ViewEvent(media_id=5),
    ),
]


@pytest.mark.parametrize(("line", "expected"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_lines(line: str, expected: pb.ViewEvent) -> None:
    parsed = parse_line(line)
    assert parsed.error is None
    assert parsed.violations == []
    assert parsed.event == expected
    assert parsed.event_id == expected.event_id
    assert parsed.event.HasField("event_time") == expected.HasField("event_time")


def test_bytes_input() -> None:
    assert parse_line(legacy().encode()).event == event()
    assert parse_line((legacy() + "\n").encode("utf-8")).event == event()


BAD: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("MediaId abc", legacy(MediaId="abc"), [("MediaId", "WRONG_TYPE")]),
    ("MediaId with fraction", legacy(MediaId=1.5), [("MediaId", "WRONG_TYPE")]),
    ("MediaId bool", legacy(MediaId=True), [("MediaId", "WRONG_TYPE")]),
    ("MediaId list", legacy(MediaId=[1]), [("MediaId", "WRONG_TYPE")]),
    ("MediaId padded string", legacy(MediaId=" 42"), [("MediaId", "WRONG_TYPE")]),
    ("MediaId float string", legacy(MediaId="4.0"), [("MediaId", "WRONG_TYPE")]),
    ("MediaId underscore string", legacy(MediaId="4_2"), [("MediaId", "WRONG_TYPE")]),
    ("UserId over int64", legacy(UserId=2**63), [("UserId", "OUT_OF_RANGE")]),
    ("UserId under int64", legacy(UserId=-(2**63) - 1), [("UserId", "OUT_OF_RANGE")]),
    ("UserId huge string", legacy(UserId="9" * 30), [("UserId", "OUT_OF_RANGE")]),
    ("UserId huge float", legacy(UserId=1e30), [("UserId", "OUT_OF_RANGE")]),
    ("EventId number", legacy(EventId=5), [("EventId", "WRONG_TYPE")]),
    ("EventType pause", legacy(EventType="pause"), [("EventType", "UNKNOWN_EVENT_TYPE")]),
    ("EventType seek", legacy(EventType="seek"), [("EventType", "UNKNOWN_EVENT_TYPE")]),
    ("EventType empty", legacy(EventType=""), [("EventType", "UNKNOWN_EVENT_TYPE")]),
    (
        "EventType proto name is not legacy",
        legacy(EventType="EVENT_TYPE_WAYPOINT"),
        [("EventType", "UNKNOWN_EVENT_TYPE")],
    ),
    ("EventType number", legacy(EventType=2), [("EventType", "WRONG_TYPE")]),
    ("DateTime garbage", legacy(DateTime="yesterday"), [("DateTime", "BAD_TIME")]),
    (
        "DateTime impossible date",
        legacy(DateTime="2024-02-30T00:00:00Z"),
        [("DateTime", "BAD_TIME")],
    ),
    ("DateTime number", legacy(DateTime=T0), [("DateTime", "WRONG_TYPE")]),
    ("Timestamp text", legacy(Timestamp="noon"), [("Timestamp", "WRONG_TYPE")]),
    ("Timestamp bool", legacy(Timestamp=True), [("Timestamp", "WRONG_TYPE")]),
    ("Timestamp NaN", legacy()[:-1] + ', "Timestamp": NaN}', [("Timestamp", "BAD_TIME")]),
    (
        "Timestamp far future",
        legacy(DateTime=None, Timestamp=1e20),
        [("Timestamp", "OUT_OF_RANGE")],
    ),
    ("mismatch +1.5 s", legacy(Timestamp=T0 + 1.5), [("DateTime", "TIME_MISMATCH")]),
    ("mismatch -2 s", legacy(Timestamp=T0 - 2), [("DateTime", "TIME_MISMATCH")]),
    (
        "mismatch one hour (time zone bug)",
        legacy(Timestamp=T0 + 3600),
        [("DateTime", "TIME_MISMATCH")],
    ),
    (
        "mismatch just over 1 s by nanoseconds",
        legacy(Timestamp=T0 + 1, DateTime="2024-03-01T11:59:59.999999999Z"),
        [("DateTime", "TIME_MISMATCH")],
    ),
    (
        "bad DateTime is reported alone, not as a mismatch",
        legacy(DateTime="soon", Timestamp=T0 + 999),
        [("DateTime", "BAD_TIME")],
    ),
    (
        "every problem is reported",
        legacy(MediaId="abc", UserId=2.5, EventType="pause", Timestamp=T0 + 30),
        [
            ("MediaId", "WRONG_TYPE"),
            ("UserId", "WRONG_TYPE"),
            ("EventType", "UNKNOWN_EVENT_TYPE"),
            ("DateTime", "TIME_MISMATCH"),
        ],
    ),
    (
        "protobuf JSON unknown enum",
        '{"eventId": "p", "eventType": "pause"}',
        [("eventType", "UNKNOWN_EVENT_TYPE")],
    ),
    ("protobuf JSON bad id", '{"eventId": "p", "mediaId": "abc"}', [("mediaId", "WRONG_TYPE")]),
    ("protobuf JSON fraction", '{"media_id": 1.5}', [("media_id", "WRONG_TYPE")]),
    (
        "protobuf JSON out of range",
        '{"userId": "99999999999999999999"}',
        [("userId", "OUT_OF_RANGE")],
    ),
    (
        "protobuf JSON time without offset",
        '{"eventId": "p", "eventTime": "2024-03-01T12:00:00"}',
        [("eventTime", "BAD_TIME")],
    ),
    (
        "protobuf JSON several bad fields",
        '{"eventId": "p", "mediaId": true, "eventTime": "x", "eventType": "EVENT_TYPE_WAYPOINT"}',
        [("mediaId", "WRONG_TYPE"), ("eventTime", "BAD_TIME")],
    ),
]


@pytest.mark.parametrize(("line", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_lines(line: str, expected: list[tuple[str, str]]) -> None:
    parsed = parse_line(line)
    assert parsed.error is None
    assert parsed.event is None
    assert [(v.field, v.reason) for v in parsed.violations] == expected
    for v in parsed.violations:
        assert v.description, "every violation explains itself"
        assert v.description.startswith(v.field) or v.field in v.description


def test_bad_line_keeps_event_id_for_reporting() -> None:
    assert parse_line(legacy(MediaId="abc", EventId="abc-1")).event_id == "abc-1"
    assert parse_line(legacy(EventId=77)).event_id == "77"
    assert parse_line('{"eventId": "p-9", "eventType": "pause"}').event_id == "p-9"


def test_mismatch_description_names_both_values() -> None:
    parsed = parse_line(legacy(Timestamp=T0 + 7200))
    (v,) = parsed.violations
    assert v.field == "DateTime" and v.reason == "TIME_MISMATCH"
    assert "DateTime" in v.description and "Timestamp" in v.description
    assert "2024-03-01T12:00:00Z" in v.description
    assert str(T0 + 7200) in v.description


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "",
        "   ",
        "{",
        '{"EventId": "x",',
        "[1, 2]",
        "42",
        '"text"',
        "null",
        "{}",
        '{"foo": 1, "bar": 2}',
        b"\xff\xfe\xfa{}",
        "[[[[[[[[[[[[[[[[[[[[" * 100,
    ],
)
def test_not_an_event(line: str | bytes) -> None:
    parsed = parse_line(line)
    assert isinstance(parsed, ParsedLine)
    assert parsed.event is None
    assert parsed.violations == []
    assert parsed.error
    assert parsed.event_id == ""


def test_error_messages_say_what_is_wrong() -> None:
    assert "not JSON" in (parse_line("nope").error or "")
    assert "array" in (parse_line("[1]").error or "")
    assert "foo" in (parse_line('{"foo": 1}').error or "")


def test_any_legacy_key_means_legacy() -> None:
    # "mediaId" is ignored because "EventId" makes the whole line legacy.
    parsed = parse_line('{"EventId": "x", "mediaId": "5"}')
    assert parsed.event == pb.ViewEvent(event_id="x")


def _random_event(rng: random.Random) -> pb.ViewEvent:
    e = pb.ViewEvent(
        event_id=rng.choice(["", f"ev-{rng.randrange(10**9)}", 'ünïcode "quoted" \\ id']),
        media_id=rng.choice([0, 1, rng.randrange(1, 10**6), 2**63 - 1, -5]),
        user_id=rng.choice([1, rng.randrange(1, 10**9), -(2**63)]),
        event_type=rng.choice([pb.EVENT_TYPE_UNSPECIFIED, START, WAYPOINT, STOP, END]),
    )
    if rng.random() < 0.9:
        nanos = rng.choice(
            [0, rng.randrange(1000) * 1_000_000, rng.randrange(10**6) * 1000, rng.randrange(10**9)]
        )
        seconds = rng.choice([T0, rng.randrange(-(10**10), 2 * 10**9), 0, 253_402_300_799])
        e.event_time.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
    return e


def test_round_trip_random_events() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        e = _random_event(rng)
        d = to_legacy_dict(e)
        assert parse_line(json.dumps(d)).event == e, d


def test_to_legacy_dict_shape() -> None:
    d = to_legacy_dict(event(event_type=START))
    assert d == {
        "EventId": "e-1",
        "MediaId": 12,
        "UserId": 7,
        "Timestamp": T0,
        "DateTime": "2024-03-01T12:00:00Z",
        "EventType": "streamstart",
    }
    assert isinstance(d["Timestamp"], int)
    d = to_legacy_dict(event(nanos=250_000_000))
    assert d["Timestamp"] == T0 + 0.25
    assert d["DateTime"] == "2024-03-01T12:00:00.250Z"
    d = to_legacy_dict(event(nanos=1_000))
    assert d["DateTime"] == "2024-03-01T12:00:00.000001Z"
    d = to_legacy_dict(event(nanos=7))
    assert d["DateTime"] == "2024-03-01T12:00:00.000000007Z"
    assert "Timestamp" not in to_legacy_dict(event(seconds=None))
    assert "EventType" not in to_legacy_dict(event(event_type=pb.EVENT_TYPE_UNSPECIFIED))
    with pytest.raises(ValueError):
        to_legacy_dict(pb.ViewEvent(event_type=cast(pb.EventType, 9)))  # not a named type


def _nanos(ts: Timestamp) -> int:
    return ts.seconds * 10**9 + ts.nanos


def test_to_legacy_dict_timestamp_agrees_with_datetime() -> None:
    """Parsing the Timestamp alone gives the same time to the microsecond."""
    rng = random.Random(3)
    for _ in range(500):
        e = event(seconds=rng.randrange(0, 2 * 10**9), nanos=rng.randrange(10**9))
        d = to_legacy_dict(e)
        del d["DateTime"]
        got = parse_line(json.dumps(d)).event
        assert got is not None
        # Rounding to whole microseconds (<= 500 ns) plus the double's resolution (~120 ns).
        assert abs(_nanos(got.event_time) - _nanos(e.event_time)) < 1000


def test_iter_file_numbers_lines_and_skips_blanks(tmp_path: Path) -> None:
    text = "\n".join([legacy(EventId="a"), "", "garbage", "   ", legacy(EventId="b", MediaId="x")])
    plain = tmp_path / "in.jsonl"
    plain.write_text(text + "\n")
    packed = tmp_path / "in.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(text)
    for path in (plain, packed):
        got = list(iter_file(str(path)))
        assert [n for n, _ in got] == [1, 3, 5]
        assert got[0][1].event == event(event_id="a")
        assert got[1][1].error
        assert [(v.field, v.reason) for v in got[2][1].violations] == [("MediaId", "WRONG_TYPE")]


def test_iter_file_is_lazy(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text((legacy() + "\n") * 1000)
    it = iter_file(str(path))
    assert next(it)[0] == 1
    it.close()  # closing early must not fail and must close the file
