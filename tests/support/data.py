"""Test data: generated legacy files parsed like the CLI does, random valid and broken events,
and which of them the ingest service accepts (decided by its validation rules, here)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from ingest_service.validation import Limits, validate_event
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.event_files import iter_file
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.generator import generate

NOW = int(time.time())
# The event types drawn for random events, weighted: mostly waypoints.
EVENT_TYPES: list[ve.EventType] = [
    ve.EVENT_TYPE_STREAM_START,
    ve.EVENT_TYPE_WAYPOINT,
    ve.EVENT_TYPE_WAYPOINT,
    ve.EVENT_TYPE_WAYPOINT,
    ve.EVENT_TYPE_STREAM_STOP,
    ve.EVENT_TYPE_STREAM_END,
]

# How each kind of broken event is made, and the violations the server must report for it.
BREAKERS = {
    "no_id": (lambda e: e.ClearField("event_id"), {("event_id", "REQUIRED")}),
    "neg_media": (lambda e: setattr(e, "media_id", -e.media_id), {("media_id", "NOT_POSITIVE")}),
    "zero_user": (lambda e: e.ClearField("user_id"), {("user_id", "REQUIRED")}),
    "no_type": (lambda e: e.ClearField("event_type"), {("event_type", "REQUIRED")}),
    "bad_type": (lambda e: setattr(e, "event_type", 42), {("event_type", "UNKNOWN_VALUE")}),
    "no_time": (lambda e: e.ClearField("event_time"), {("event_time", "REQUIRED")}),
    "future": (lambda e: e.event_time.FromSeconds(NOW + 86400), {("event_time", "IN_FUTURE")}),
}


def make_events(
    count: int, seed: int, bad_share: float = 0.05
) -> tuple[list[ve.ViewEvent], list[tuple[ve.ViewEvent, set]]]:
    """`count` events in stream order; returns them and, for the broken ones, the expected
    violations (decided here, independently of the service's validation code)."""
    rng = random.Random(seed)
    events: list[ve.ViewEvent] = []
    valid: list[ve.ViewEvent] = []
    broken: list[tuple[ve.ViewEvent, set]] = []
    for n in range(count):
        event = ve.ViewEvent(
            event_id=f"{seed}-{n}",
            media_id=rng.randint(1, 500),
            user_id=rng.randint(1, 5000),
            event_type=rng.choice(EVENT_TYPES),
            event_time=Timestamp(
                seconds=NOW - rng.randint(0, 30 * 86400), nanos=rng.randint(0, 999_999_999)
            ),
        )
        if rng.random() < bad_share:
            kind = rng.choice(sorted(BREAKERS))
            breaker, expected = BREAKERS[kind]
            breaker(event)
            broken.append((event, expected))
        else:
            if valid and rng.random() < 0.01:
                event = ve.ViewEvent()
                event.CopyFrom(rng.choice(valid[-100:]))  # re-sent: may appear twice in Kafka
            valid.append(event)
        events.append(event)
    return events, broken


# The stats tests' files: 5 % noise over three days, enough users and media for long top-N lists.
STATS_FILE: dict[str, object] = dict(noise=0.05, days=3.0, users=5_000, media=800)


def generated_events(path: Path, count: int, seed: int, **options: object) -> list[ve.ViewEvent]:
    """A noisy legacy file from viewevents_tools.generator (`options` go to `generate`), parsed as
    the CLI would: lines that cannot be represented are dropped client-side; the rest go to the
    ingest service, invalid or not."""
    generate(str(path), count, seed=seed, **options)  # type: ignore[arg-type]
    return [parsed.event for _, parsed in iter_file(str(path)) if parsed.event is not None]


def accepted_events(
    events: Iterable[ve.ViewEvent], config: settings.Config | None = None
) -> list[ve.ViewEvent]:
    """What the ingest service accepts (duplicates included): valid by its rules and limits."""
    limits = (
        Limits()
        if config is None
        else Limits(config.max_future_skew_seconds, config.max_event_age_days * 86400)
    )
    now = time.time()
    return [e for e in events if not validate_event(e, now, limits)]


def first_copies(events: Iterable[ve.ViewEvent]) -> list[ve.ViewEvent]:
    """What a consumer counts: the first copy of each event id, in order."""
    seen: set[str] = set()
    out = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            out.append(event)
    return out
