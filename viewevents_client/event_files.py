"""Turn one input line (legacy player JSON or grpcurl-style protobuf JSON) into a ViewEvent.

The split of responsibilities is deliberate: this module only rejects values that *cannot be
represented* in a ViewEvent (wrong type, unknown event type, unparseable or contradictory time,
numbers outside int64). Everything representable, including missing fields, zero or negative ids,
is passed through unchanged so that the ingest service applies its one set of validation rules
and sends the event to its dead-letter topic, where it can be inspected with the others.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, cast

from google.protobuf import json_format

from viewevents.v1 import view_event_pb2
from viewevents.v1.view_event_pb2 import FieldViolation, ViewEvent

__all__ = [
    "LEGACY_KEYS",
    "MAX_EVENT_BYTES",
    "PROTO_KEYS",
    "ParsedLine",
    "iter_file",
    "open_lines",
    "parse_line",
    "to_legacy_dict",
]

# Keys of the legacy player format; any one of them present means "legacy".
LEGACY_KEYS: frozenset[str] = frozenset(
    {"EventId", "MediaId", "UserId", "Timestamp", "DateTime", "EventType"}
)
# Keys protobuf JSON may use for ViewEvent (lowerCamelCase json_name and the proto field names).
PROTO_KEYS: frozenset[str] = frozenset(
    {
        "eventId",
        "mediaId",
        "userId",
        "eventType",
        "eventTime",
        "event_id",
        "media_id",
        "user_id",
        "event_type",
        "event_time",
    }
)

# No real event comes near this (they are ~100 bytes); one that does cannot be stored by the
# ingest service (event_id limit, Kafka's record limit) and could exceed its request limit, so
# it is reported here, with its line, instead of failing a whole upload.
MAX_EVENT_BYTES = 64 * 1024

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# The range google.protobuf.Timestamp allows (0001-01-01 .. 9999-12-31, UTC).
_TS_MIN_SECONDS = -62_135_596_800
_TS_MAX_SECONDS = 253_402_300_799
_NANOS = 1_000_000_000
# DateTime and Timestamp may disagree by this much (players round differently), not more.
_TOLERANCE_NANOS = _NANOS

_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_fromisoformat = datetime.fromisoformat

_ET = view_event_pb2.EventType
_LEGACY_TYPES: dict[str, int] = {
    "streamstart": _ET.EVENT_TYPE_STREAM_START,
    "waypoint": _ET.EVENT_TYPE_WAYPOINT,
    "streamstop": _ET.EVENT_TYPE_STREAM_STOP,
    "streamend": _ET.EVENT_TYPE_STREAM_END,
}
_LEGACY_NAMES: dict[int, str] = {v: k for k, v in _LEGACY_TYPES.items()}


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """Outcome of parsing one line; exactly one of event / violations / error is meaningful."""

    event: ViewEvent | None
    """None when the line is not an event at all or has client-side violations."""
    violations: list[FieldViolation]
    """Client-side violations (event is None when non-empty)."""
    error: str | None
    """Set when the line is not JSON, not a JSON object, or has none of the known keys."""
    event_id: str
    """Best-effort id for reporting ("" if none)."""


def _violation(field: str, reason: str, description: str) -> FieldViolation:
    return FieldViolation(field=field, description=description, reason=reason)


def _short(value: Any) -> str:
    """JSON-ish rendering of an offending value for messages, kept short for log lines."""
    text = (
        json.dumps(value) if not isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    )
    return text if len(text) <= 60 else text[:57] + "..."


def _int_field(key: str, value: Any) -> tuple[int, FieldViolation | None]:
    """int64 from a JSON number or a decimal string (players send both)."""
    tp = type(value)
    if tp is int:
        n = value
    elif tp is str:
        body = value[1:] if value[:1] in ("-", "+") else value
        if not (body.isascii() and body.isdigit()):
            return 0, _violation(
                key, "WRONG_TYPE", f"{key} must be an integer, got the string {_short(value)}"
            )
        n = int(value)
    elif tp is float:
        if not value.is_integer():  # also rejects NaN and infinities
            return 0, _violation(
                key, "WRONG_TYPE", f"{key} must be an integer, got the number {value!r}"
            )
        n = int(value)
    else:
        kind = "a boolean" if tp is bool else f"a JSON {_json_kind(value)}"
        return 0, _violation(
            key, "WRONG_TYPE", f"{key} must be an integer, got {kind} {_short(value)}"
        )
    if n < _INT64_MIN or n > _INT64_MAX:
        return 0, _violation(
            key, "OUT_OF_RANGE", f"{key} {n} does not fit in a signed 64-bit integer"
        )
    return n, None


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _range_violation(key: str, raw: Any) -> FieldViolation:
    return _violation(
        key,
        "OUT_OF_RANGE",
        f"{key} {_short(raw)} is outside 0001-01-01..9999-12-31, the range of a protobuf Timestamp",
    )


def _unix_field(key: str, value: Any) -> tuple[int, int, FieldViolation | None]:
    """(seconds, nanos) from Unix seconds given as int, float or numeric string.

    Floats are rounded to microseconds: a double near 1.7e9 only resolves ~0.24 us, so finer
    digits would be noise (0.123 would otherwise become 0.122999907 s).
    """
    tp = type(value)
    if tp is int:
        seconds, nanos = value, 0
    else:
        if tp is str:
            body = value[1:] if value[:1] in ("-", "+") else value
            if body.isascii() and body.isdigit():
                return _unix_field(key, int(value))
            try:
                x = float(value)
            except ValueError:
                return (
                    0,
                    0,
                    _violation(
                        key,
                        "WRONG_TYPE",
                        f"{key} must be Unix seconds, got the string {_short(value)}",
                    ),
                )
        elif tp is float:
            x = value
        else:
            kind = "a boolean" if tp is bool else f"a JSON {_json_kind(value)}"
            return (
                0,
                0,
                _violation(
                    key, "WRONG_TYPE", f"{key} must be Unix seconds, got {kind} {_short(value)}"
                ),
            )
        if not math.isfinite(x):
            return (
                0,
                0,
                _violation(key, "BAD_TIME", f"{key} {_short(value)} is not a finite number"),
            )
        if not (_TS_MIN_SECONDS <= x < _TS_MAX_SECONDS + 1):
            return 0, 0, _range_violation(key, value)
        seconds = math.floor(x)
        micros = round((x - seconds) * 1_000_000)
        if micros >= 1_000_000:
            seconds += 1
            micros -= 1_000_000
        nanos = micros * 1000
    if not (_TS_MIN_SECONDS <= seconds <= _TS_MAX_SECONDS):
        return 0, 0, _range_violation(key, value)
    return seconds, nanos, None


def _datetime_field(key: str, value: Any) -> tuple[int, int, FieldViolation | None]:
    """(seconds, nanos) from ISO 8601 text; no offset means UTC; up to 9 fraction digits kept."""
    if type(value) is not str:
        return (
            0,
            0,
            _violation(
                key,
                "WRONG_TYPE",
                f"{key} must be an ISO 8601 string, got a JSON {_json_kind(value)} {_short(value)}",
            ),
        )
    try:
        dt = _fromisoformat(value)
    except ValueError:
        return (
            0,
            0,
            _violation(
                key,
                "BAD_TIME",
                f"{key} {_short(value)} is not an ISO 8601 date-time such as 2024-03-01T12:00:00Z",
            ),
        )
    delta = dt - (_EPOCH_NAIVE if dt.tzinfo is None else _EPOCH_UTC)
    seconds = delta.days * 86400 + delta.seconds
    nanos = delta.microseconds * 1000
    if "." in value or "," in value:
        # fromisoformat truncates to microseconds; recover nanoseconds from the text itself.
        i = max(value.rfind("."), value.rfind(","))
        j = i + 1
        while j < len(value) and value[j].isdigit():
            j += 1
        if j - i - 1 > 6:
            nanos = delta.microseconds * 1000 + int(value[i + 7 : min(j, i + 10)].ljust(3, "0"))
    if not (_TS_MIN_SECONDS <= seconds <= _TS_MAX_SECONDS):
        return 0, 0, _range_violation(key, value)
    return seconds, nanos, None


def _parse_legacy(obj: dict[str, Any]) -> ParsedLine:
    violations: list[FieldViolation] = []
    kwargs: dict[str, Any] = {}
    event_id = ""
    get = obj.get

    value = get("EventId")
    if value is not None:
        if type(value) is str:
            kwargs["event_id"] = event_id = value
        else:
            if type(value) is int:
                event_id = str(value)
            violations.append(
                _violation(
                    "EventId",
                    "WRONG_TYPE",
                    f"EventId must be a string, got a JSON {_json_kind(value)} {_short(value)}",
                )
            )

    value = get("MediaId")
    if value is not None:
        n, v = _int_field("MediaId", value)
        if v is None:
            kwargs["media_id"] = n
        else:
            violations.append(v)

    value = get("UserId")
    if value is not None:
        n, v = _int_field("UserId", value)
        if v is None:
            kwargs["user_id"] = n
        else:
            violations.append(v)

    value = get("EventType")
    if value is not None:
        if type(value) is str:
            code = _LEGACY_TYPES.get(value.lower())
            if code is None:
                violations.append(
                    _violation(
                        "EventType",
                        "UNKNOWN_EVENT_TYPE",
                        f"EventType {_short(value)} is not one of "
                        "streamstart, waypoint, streamstop, streamend",
                    )
                )
            else:
                kwargs["event_type"] = code
        else:
            violations.append(
                _violation(
                    "EventType",
                    "WRONG_TYPE",
                    f"EventType must be a string, got a JSON {_json_kind(value)} {_short(value)}",
                )
            )

    dt_raw = get("DateTime")
    ts_raw = get("Timestamp")
    when: tuple[int, int] | None = None
    if dt_raw is not None:
        s, ns, v = _datetime_field("DateTime", dt_raw)
        if v is None:
            when = (s, ns)
        else:
            violations.append(v)
    if ts_raw is not None:
        s2, ns2, v = _unix_field("Timestamp", ts_raw)
        if v is not None:
            violations.append(v)
        elif dt_raw is None:
            when = (s2, ns2)
        elif when is not None:
            diff = abs((when[0] - s2) * _NANOS + (when[1] - ns2))
            if diff > _TOLERANCE_NANOS:
                violations.append(
                    _violation(
                        "DateTime",
                        "TIME_MISMATCH",
                        f"DateTime {_short(dt_raw)} and Timestamp {_short(ts_raw)} are "
                        f"{diff / _NANOS:.3f} s apart; they must agree within 1 s",
                    )
                )
    if violations:
        return ParsedLine(None, violations, None, event_id)
    if when is not None:
        kwargs["event_time"] = {"seconds": when[0], "nanos": when[1]}
    return ParsedLine(ViewEvent(**kwargs), violations, None, event_id)


_PROTO_ID_KEYS = frozenset({"mediaId", "userId", "media_id", "user_id"})
_PROTO_TYPE_KEYS = frozenset({"eventType", "event_type"})
_PROTO_TIME_KEYS = frozenset({"eventTime", "event_time"})


def _proto_reason(key: str, value: Any) -> str:
    """Classify a ParseError by the value that caused it, not by the library's message text."""
    if key in _PROTO_TYPE_KEYS:
        return "UNKNOWN_EVENT_TYPE" if isinstance(value, str) else "WRONG_TYPE"
    if key in _PROTO_TIME_KEYS:
        return "BAD_TIME" if isinstance(value, str) else "WRONG_TYPE"
    if key in _PROTO_ID_KEYS and type(value) in (int, float, str):
        try:
            n = int(float(value)) if not isinstance(value, int) else value
        except (ValueError, OverflowError):
            return "WRONG_TYPE"
        if n < _INT64_MIN or n > _INT64_MAX:
            return "OUT_OF_RANGE"
    return "WRONG_TYPE"


def _parse_proto(obj: dict[str, Any]) -> ParsedLine:
    # Unknown keys are dropped here rather than with ignore_unknown_fields=True, because that
    # option also silently drops unknown enum names ("pause"), which must be a violation.
    known = {k: v for k, v in obj.items() if k in PROTO_KEYS}
    raw_id = known.get("eventId", known.get("event_id"))
    event_id = raw_id if isinstance(raw_id, str) else ""
    event = ViewEvent()
    try:
        json_format.ParseDict(known, event)
    except json_format.ParseError:
        # Parse field by field so that every bad field is reported, each under its own key.
        violations: list[FieldViolation] = []
        event = ViewEvent()
        for key, value in known.items():
            try:
                json_format.ParseDict({key: value}, event)
            except json_format.ParseError as exc:
                violations.append(
                    _violation(key, _proto_reason(key, value), f"{key} {_short(value)}: {exc}")
                )
        if violations:
            return ParsedLine(None, violations, None, event_id)
    return ParsedLine(event, [], None, event_id)


def parse_line(line: str | bytes) -> ParsedLine:
    """Parse one JSON line, legacy or protobuf JSON (detected by its keys), into a ViewEvent."""
    parsed = _parse_json_line(line)
    # JSON never encodes shorter than protobuf, so only long lines need measuring.
    if parsed.event is not None and len(line) > MAX_EVENT_BYTES:
        size = parsed.event.ByteSize()
        if size > MAX_EVENT_BYTES:
            return ParsedLine(
                None,
                [
                    _violation(
                        "event",
                        "TOO_LARGE",
                        f"the event encodes to {size} bytes; at most "
                        f"{MAX_EVENT_BYTES} can be uploaded (event id {_short(parsed.event_id[:64])}"
                        f"{'...' if len(parsed.event_id) > 64 else ''})",
                    )
                ],
                None,
                parsed.event_id[:64],
            )
    return parsed


def _parse_json_line(line: str | bytes) -> ParsedLine:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        return ParsedLine(None, [], f"not JSON: {exc}", "")
    if type(obj) is not dict:
        return ParsedLine(None, [], f"not a JSON object but a JSON {_json_kind(obj)}", "")
    if not LEGACY_KEYS.isdisjoint(obj):
        return _parse_legacy(obj)
    if not PROTO_KEYS.isdisjoint(obj):
        return _parse_proto(obj)
    keys = ", ".join(sorted(obj)[:8]) or "none"
    return ParsedLine(None, [], f"no ViewEvent keys in the JSON object (its keys: {keys})", "")


def open_lines(path: str) -> BinaryIO:
    """Binary reader for path ("-" is stdin); gzip is recognised by its magic bytes, not name."""
    if path == "-":
        raw: BinaryIO = sys.stdin.buffer
    else:
        raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    head = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
    if head == b"\x1f\x8b":
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw


def iter_file(path: str) -> Generator[tuple[int, ParsedLine], None, None]:
    """Stream (1-based line number, parsed line) from a file, .gz or not; blank lines skipped."""
    f = open_lines(path)
    inner = cast(BinaryIO, f.fileobj) if isinstance(f, gzip.GzipFile) else None
    try:
        for number, line in enumerate(f, 1):
            if line.isspace():
                continue
            yield number, parse_line(line)
    finally:
        if path != "-":
            f.close()  # GzipFile does not close a file object it was given
            if inner is not None:
                inner.close()


def _format_datetime(seconds: int, nanos: int) -> str:
    """RFC 3339 UTC with 'Z', showing only as many fraction digits as the value needs."""
    if seconds >= 0:
        t = time.gmtime(seconds)
        y, mo, d, h, mi, s = t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec
    else:  # gmtime of negative values is platform-dependent; datetime is not
        dt = _EPOCH_UTC + timedelta(seconds=seconds)
        y, mo, d, h, mi, s = dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second
    base = f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}"
    if nanos == 0:
        return base + "Z"
    if nanos % 1_000_000 == 0:
        return f"{base}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{base}.{nanos // 1000:06d}Z"
    return f"{base}.{nanos:09d}Z"


def to_legacy_dict(event: ViewEvent) -> dict[str, Any]:
    """Legacy-format dict for an event, so cleaned data can be written back in the players' format.

    Both Timestamp and DateTime are written (int seconds when there is no fraction, otherwise a
    float; DateTime with the same fraction, up to nanoseconds). Unset time and an UNSPECIFIED
    type are left out, which parse_line maps back to the same defaults.
    """
    out: dict[str, Any] = {
        "EventId": event.event_id,
        "MediaId": event.media_id,
        "UserId": event.user_id,
    }
    if event.HasField("event_time"):
        seconds, nanos = event.event_time.seconds, event.event_time.nanos
        # int / int is correctly rounded in Python, unlike seconds + nanos / 1e9.
        out["Timestamp"] = seconds if nanos == 0 else (seconds * _NANOS + nanos) / _NANOS
        out["DateTime"] = _format_datetime(seconds, nanos)
    if event.event_type != _ET.EVENT_TYPE_UNSPECIFIED:
        name = _LEGACY_NAMES.get(event.event_type)
        if name is None:
            raise ValueError(f"event type {event.event_type} has no legacy name")
        out["EventType"] = name
    return out
