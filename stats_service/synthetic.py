"""Seeded synthetic viewing sessions for the stats benchmark and tests.

Shaped like player traffic rather than uniform noise, because the stats consumer's cost depends
on how many distinct (media, minute) and (media, user, day) keys a batch touches: users watch
Zipf-popular media in sessions of a start, a waypoint every heartbeat, then a stop or an end.
Optional noise: duplicated events (re-sent later), late events (delivered out of order) and
invalid events (for the ingest path to reject).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf import timestamp_pb2

from viewevents.v1 import view_event_pb2

ViewEvent = view_event_pb2.ViewEvent


@dataclass(frozen=True)
class Shape:
    """What to generate; times are Unix seconds."""

    events: int = 100_000
    users: int = 20_000
    media: int = 2_000
    start: int = 1_767_225_600  # 2026-01-01T00:00:00Z
    days: float = 3.0
    heartbeat: int = 30
    mean_waypoints: float = 20.0
    zipf: float = 1.1
    duplicates: float = 0.0  # fraction of events sent a second time, later
    late: float = 0.0  # fraction of events delivered up to `late_seconds` after their time
    late_seconds: int = 6 * 3600
    invalid: float = 0.0  # fraction of extra events that break a validation rule
    seed: int = 7


def sessions(shape: Shape) -> list[tuple[str, int, int, int, int]]:
    """(event_id, media_id, user_id, event_type, event_seconds) in delivery order."""
    rng = np.random.default_rng(shape.seed)
    rows: list[tuple[int, int, int, int]] = []  # (media, user, type, seconds)
    weights = 1.0 / np.arange(1, shape.media + 1) ** shape.zipf
    weights /= weights.sum()
    media_ids = rng.permutation(shape.media) + 1
    span = int(shape.days * 86_400)
    while len(rows) < shape.events:
        count = 4096
        media = media_ids[rng.choice(shape.media, count, p=weights)]
        users = rng.integers(1, shape.users + 1, count)
        starts = shape.start + rng.integers(0, span, count)
        waypoints = rng.geometric(1.0 / (shape.mean_waypoints + 1), count) - 1
        ended = rng.random(count) < 0.4
        for m, u, t0, w, end in zip(media.tolist(), users.tolist(), starts.tolist(),
                                    waypoints.tolist(), ended.tolist()):
            rows.append((m, u, 1, t0))
            rows.extend((m, u, 2, t0 + shape.heartbeat * (i + 1)) for i in range(w))
            rows.append((m, u, 4 if end else 3, t0 + shape.heartbeat * (w + 1)))
    rows = rows[:shape.events]
    times = np.array([r[3] for r in rows], np.int64)
    delivery = times.astype(np.float64)
    late = rng.random(len(rows)) < shape.late
    delivery[late] += rng.integers(1, shape.late_seconds, int(late.sum()))
    order = np.argsort(delivery, kind="stable")
    out = [(f"ev-{shape.seed}-{i}", *rows[i]) for i in order.tolist()]
    if shape.duplicates:
        picks = rng.choice(len(out), int(len(out) * shape.duplicates), replace=False)
        for pick in sorted(picks.tolist(), reverse=True):  # re-sent a little later
            out.insert(min(len(out), pick + int(rng.integers(1, 5000))), out[pick])
    return out


def to_event(row: tuple[str, int, int, int, int]) -> ViewEvent:
    event_id, media, user, kind, seconds = row
    return ViewEvent(event_id=event_id, media_id=media, user_id=user, event_type=kind,  # type: ignore[arg-type]
                     event_time=timestamp_pb2.Timestamp(seconds=seconds))


def with_invalid(events: list[ViewEvent], fraction: float, seed: int = 11) -> list[ViewEvent]:
    """Mix in events that the ingest service must reject (bad ids, types or times)."""
    rng = np.random.default_rng(seed)
    out = list(events)
    for i in range(int(len(events) * fraction)):
        bad = ViewEvent()
        bad.CopyFrom(events[int(rng.integers(0, len(events)))])
        bad.event_id = f"bad-{seed}-{i}"
        flaw = i % 5
        if flaw == 0:
            bad.media_id = -bad.media_id
        elif flaw == 1:
            bad.user_id = 0
        elif flaw == 2:
            bad.event_type = view_event_pb2.EVENT_TYPE_UNSPECIFIED
        elif flaw == 3:
            bad.ClearField("event_time")
        else:
            bad.event_id = ""
        out.insert(int(rng.integers(0, len(out) + 1)), bad)
    return out
