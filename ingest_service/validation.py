"""Validation of one view event: pure, no I/O, so it is tested without servers.

Every problem is reported (not only the first), each naming the field and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from viewevents.v1 import view_event_pb2

ViewEvent = view_event_pb2.ViewEvent
FieldViolation = view_event_pb2.FieldViolation

KNOWN_EVENT_TYPES = frozenset(
    v.number for v in view_event_pb2.EventType.DESCRIPTOR.values if v.number != 0
)
ECHO_CHARACTERS = 64  # how much of a rejected value is echoed back or kept on the dead letter


@dataclass(frozen=True)
class Limits:
    """How far from the server's clock an event time may be, and how big an event may be."""

    max_future_skew_seconds: int = 300
    max_event_age_seconds: int = 3650 * 86400
    max_event_id_bytes: int = 256
    max_record_bytes: int = 1_000_000  # encoded key + value of one Kafka record


def abbreviate(text: str, keep: int = ECHO_CHARACTERS) -> str:
    """`text` itself when short, else its start and its size: what a rejection may echo."""
    if len(text) <= keep:
        return text
    return f"{text[:keep]}… ({len(text.encode('utf-8', 'surrogatepass'))} bytes)"


def utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it when its length alone decides."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def validate_record_size(key_bytes: int, value_bytes: int, limits: Limits) -> FieldViolation | None:
    """A violation when the encoded event cannot be stored as one Kafka record."""
    size = key_bytes + value_bytes
    if size <= limits.max_record_bytes:
        return None
    return FieldViolation(
        field="",
        reason="TOO_LARGE",
        description=f"the encoded event is {size} bytes; at most {limits.max_record_bytes} fit "
        "in one Kafka record (the topic's max.message.bytes)",
    )


def dead_letter_copy(event: ViewEvent, limits: Limits) -> ViewEvent:
    """What the dead-letter record keeps of a rejected event: small enough to always be stored
    (a long event_id is abbreviated, fields this version does not know are dropped)."""
    kept = ViewEvent()
    kept.CopyFrom(event)
    kept.DiscardUnknownFields()
    if utf8_length(kept.event_id) > limits.max_event_id_bytes:
        kept.event_id = abbreviate(kept.event_id)
    return kept


def validate_event(event: ViewEvent, now_seconds: float, limits: Limits) -> list[FieldViolation]:
    """All field violations of `event`; an empty list means it is valid."""
    violations: list[FieldViolation] = []
    event_id = event.event_id
    if not event_id:
        violations.append(_violation("event_id", "is required", "REQUIRED"))
    elif len(event_id) * 4 > limits.max_event_id_bytes:  # else short enough whatever it holds
        size = utf8_length(event_id)
        if size > limits.max_event_id_bytes:
            violations.append(
                _violation(
                    "event_id",
                    f"is {size} bytes ({abbreviate(event_id)!r}); at most "
                    f"{limits.max_event_id_bytes} bytes (UTF-8)",
                    "TOO_LONG",
                )
            )
    if event.media_id <= 0:
        violations.append(_positive("media_id", event.media_id))
    if event.user_id <= 0:
        violations.append(_positive("user_id", event.user_id))
    event_type = event.event_type
    if event_type == 0:
        violations.append(
            _violation(
                "event_type",
                "is required (EVENT_TYPE_UNSPECIFIED is not an event type)",
                "REQUIRED",
            )
        )
    elif event_type not in KNOWN_EVENT_TYPES:
        violations.append(
            _violation("event_type", f"has unknown value {event_type}", "UNKNOWN_VALUE")
        )
    if not event.HasField("event_time"):
        violations.append(_violation("event_time", "is required", "REQUIRED"))
    elif not 0 <= event.event_time.nanos < 1_000_000_000:
        violations.append(
            _violation(
                "event_time",
                f"has nanos {event.event_time.nanos}; they must be 0 to 999,999,999",
                "OUT_OF_RANGE",
            )
        )
    else:
        seconds = event.event_time.seconds + event.event_time.nanos / 1e9
        if seconds > now_seconds + limits.max_future_skew_seconds:
            violations.append(
                _violation(
                    "event_time",
                    f"is {seconds - now_seconds:.0f} s in the future; at most "
                    f"{limits.max_future_skew_seconds} s ahead of the server clock is accepted",
                    "IN_FUTURE",
                )
            )
        elif seconds < now_seconds - limits.max_event_age_seconds:
            violations.append(
                _violation(
                    "event_time",
                    f"is {(now_seconds - seconds) / 86400:.0f} days old; at most "
                    f"{limits.max_event_age_seconds // 86400} days is accepted",
                    "TOO_OLD",
                )
            )
    return violations


def _violation(field: str, problem: str, reason: str) -> FieldViolation:
    return FieldViolation(field=field, description=f"{field} {problem}", reason=reason)


def _positive(field: str, value: int) -> FieldViolation:
    problem = "is required" if value == 0 else f"must be positive, got {value}"
    return _violation(field, problem, "REQUIRED" if value == 0 else "NOT_POSITIVE")
