"""Seeded synthetic view-event data in the legacy player format, with planted structure and noise.

Why synthetic: tests, benchmarks and the recommender evaluation need data sets of any size whose
ground truth is known. The co-viewing structure is planted (media groups, users' home groups) so
recommendations can be scored against media_group(), and the noise kinds are exactly the ones the
ingest path must survive (bad fields, duplicates, late and out-of-order events, garbage lines).

Memory stays constant in the number of events: sessions live in a heap bounded by concurrency,
the duplicate and late-event buffers are capped, and lines are streamed out in fixed-size chunks.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, BinaryIO, cast

__all__ = [
    "NOISE_KINDS",
    "WAYPOINT_SECONDS",
    "GenStats",
    "add_arguments",
    "generate",
    "main",
    "media_group",
    "media_length",
    "run",
    "user_groups",
]

WAYPOINT_SECONDS = 30
"""Players send a waypoint every 30 s of playback."""
MAX_WAYPOINTS = 120
"""Longest media item, in waypoints (one hour)."""
DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)

# Noise kinds and their relative shares of the noisy lines. "not_json" is rare on purpose.
NOISE_KINDS: tuple[str, ...] = (
    "missing_field",  # one key dropped (both time keys for "time"): server-side rejection
    "wrong_type",  # MediaId "abc" / 1.5, UserId "abc" / 2.5: client-side violation
    "non_positive",  # UserId -3 / 0, MediaId 0 / -1: representable, server rejects
    "unknown_event_type",  # "pause", "seek", ...: client-side violation
    "duplicate",  # an earlier clean line repeated byte for byte (same EventId)
    "late",  # a real event held back for hours or days, written out of order
    "time_mismatch",  # Timestamp more than 1 s away from DateTime: client-side violation
    "not_json",  # a truncated line or a stray log line
)
_NOISE_WEIGHTS: tuple[float, ...] = (2.0, 2.0, 1.0, 2.0, 2.0, 2.0, 1.5, 0.5)

_ZIPF_EXPONENT = 1.0  # media popularity ~ 1 / rank
_WATCH_ALPHA = 0.8  # P(watch >= k waypoints) = k ** -0.8: heavy-tailed sessions
_IN_GROUP_SHARE = 0.85  # share of sessions on media of the user's own groups
_SECOND_GROUP_SHARE = 0.15  # users with a second home group
_SECOND_GROUP_PICK = 0.3  # how often such a user watches the second group
_CONTINUE_VISIT = 0.5  # after a session, the user watches another one right away
_MAX_JITTER_S = 4.0  # upload delay: lines are ordered by arrival, not event time
_DUP_RING = 1024  # duplicates repeat one of the last this-many clean lines
_LATE_CAP = 20_000  # at most this many held-back events (memory bound)
_LATE_DELAY = (0.02, 0.25)  # hold-back as a share of the time span: hours to days for a week
_CHUNK_LINES = 2048  # lines per write: bounds the output buffer to ~300 kB

_TYPE_NAMES = ("streamstart", "waypoint", "streamstop", "streamend")
_BAD_TYPES = ("pause", "seek", "buffering", "resume")
_GARBAGE = (
    "ERROR player upload failed: connection reset by peer",
    "EventId=1&MediaId=2&UserId=3&EventType=waypoint",
    "<html><body>502 Bad Gateway</body></html>",
    "null-terminated buffer overflow in telemetry sink",
)
_MASK64 = (1 << 64) - 1


@dataclass
class GenStats:
    """What generate() wrote; lines == events + sum(noise.values())."""

    lines: int = 0
    """Every line written (the requested `events`)."""
    events: int = 0
    """Clean, on-time, first-occurrence session events (would all be accepted by the server)."""
    sessions: int = 0
    """Sessions whose streamstart was drawn (written clean, as noise, or held back as late);
    the last sessions may be cut off by the end of the file."""
    noise: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NOISE_KINDS, 0))
    """Lines per noise kind."""
    elapsed: float = field(default=0.0, compare=False)
    """Wall-clock seconds spent (not part of equality: runs are otherwise reproducible)."""

    @property
    def noise_lines(self) -> int:
        """All noisy lines together."""
        return sum(self.noise.values())


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, stateless, platform-independent hash for per-id choices."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def user_groups(user_id: int, seed: int = 1, groups: int = 20) -> tuple[int, ...]:
    """The planted home group of a user, then its second group if it has one.

    Hash-based rather than stored so that any number of users costs no memory.
    """
    h = _mix64(_mix64(seed & _MASK64) ^ (user_id & _MASK64))
    home = h % groups
    if groups > 1 and ((h >> 24) % 10_000) < _SECOND_GROUP_SHARE * 10_000:
        return home, (home + 1 + (h >> 40) % (groups - 1)) % groups
    return (home,)


@dataclass(frozen=True)
class _Layout:
    """Per-media facts derived from (seed, media, groups): groups, popularity, lengths."""

    group_of: tuple[int, ...]  # index = media id (0 unused)
    length_of: tuple[int, ...]  # media length in waypoints, index = media id
    global_ids: tuple[int, ...]  # media ids with cumulative popularity weights
    global_cum: tuple[float, ...]
    group_ids: tuple[tuple[int, ...], ...]
    group_cum: tuple[tuple[float, ...], ...]
    mean_waypoints: float  # expected waypoints per session (popularity-weighted)


@lru_cache(maxsize=8)
def _layout(seed: int, media: int, groups: int) -> _Layout:
    rng = random.Random(f"viewevents_tools.generator.layout:{seed}:{media}:{groups}")
    ids = list(range(1, media + 1))
    rng.shuffle(ids)
    group_of = [0] * (media + 1)
    for pos, mid in enumerate(ids):  # a seeded permutation dealt round-robin: equal-size groups
        group_of[mid] = pos % groups
    rng.shuffle(ids)  # popularity rank is independent of the group
    weight = [0.0] * (media + 1)
    for rank, mid in enumerate(ids, 1):
        weight[mid] = rank**-_ZIPF_EXPONENT
    lo, hi = math.log(2), math.log(MAX_WAYPOINTS)
    length_of = [0] + [
        max(2, min(MAX_WAYPOINTS, round(math.exp(rng.uniform(lo, hi))))) for _ in range(media)
    ]
    members: list[list[int]] = [[] for _ in range(groups)]
    for mid in ids:  # by popularity, so bisect lands early most of the time
        members[group_of[mid]].append(mid)

    def cumulative(mids: Sequence[int]) -> tuple[float, ...]:
        total, out = 0.0, []
        for mid in mids:
            total += weight[mid]
            out.append(total)
        return tuple(out)

    # E[min(W, L)] = sum_{k=1..L} P(W >= k) = sum k^-alpha, with W = floor(Pareto(alpha)).
    harmonic = [0.0]
    for k in range(1, MAX_WAYPOINTS + 1):
        harmonic.append(harmonic[-1] + k**-_WATCH_ALPHA)
    total_w = sum(weight)
    mean_wp = sum(weight[m] * harmonic[length_of[m]] for m in ids) / total_w
    return _Layout(
        group_of=tuple(group_of),
        length_of=tuple(length_of),
        global_ids=tuple(ids),
        global_cum=cumulative(ids),
        group_ids=tuple(tuple(g) for g in members),
        group_cum=tuple(cumulative(g) for g in members),
        mean_waypoints=mean_wp,
    )


def media_group(media_id: int, seed: int = 1, media: int = 2_000, groups: int = 20) -> int:
    """Planted group (0..groups-1) of a media id, for scoring recommendations against the truth."""
    if not 1 <= media_id <= media:
        raise ValueError(f"media id {media_id} is outside 1..{media}")
    return _layout(seed, media, groups).group_of[media_id]


def media_length(media_id: int, seed: int = 1, media: int = 2_000, groups: int = 20) -> int:
    """Length of a media item in waypoints; sessions never have more waypoints than this."""
    if not 1 <= media_id <= media:
        raise ValueError(f"media id {media_id} is outside 1..{media}")
    return _layout(seed, media, groups).length_of[media_id]


class _DateTimes:
    """Fast "YYYY-MM-DDTHH:MM:SSZ" for integer Unix seconds: the date part is cached per day."""

    def __init__(self) -> None:
        self._days: dict[int, str] = {}

    def __call__(self, t: int) -> str:
        day, sec = divmod(t, 86400)
        prefix = self._days.get(day)
        if prefix is None:
            if len(self._days) > 4096:
                self._days.clear()
            prefix = self._days[day] = time.strftime("%Y-%m-%dT", time.gmtime(day * 86400))
        h, rest = divmod(sec, 3600)
        m, s = divmod(rest, 60)
        return f"{prefix}{h:02d}:{m:02d}:{s:02d}Z"


def _open_out(path: str) -> tuple[BinaryIO, list[BinaryIO]]:
    """Writable binary stream plus what to close; gzip output has no name or mtime in its header,
    so the same seed gives byte-identical .gz files."""
    if path == "-":
        return sys.stdout.buffer, []
    raw = open(path, "wb")  # noqa: SIM115 - closed by the caller
    if path.endswith(".gz"):
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)
        return cast(BinaryIO, gz), [cast(BinaryIO, gz), raw]
    return raw, [raw]


def generate(
    path: str,
    events: int,
    *,
    seed: int = 1,
    users: int = 20_000,
    media: int = 2_000,
    groups: int = 20,
    noise: float = 0.02,
    start: datetime = DEFAULT_START,
    days: float = 7,
    progress: bool = False,
) -> GenStats:
    """Write exactly `events` lines of legacy JSON to path (".gz" compresses, "-" is stdout).

    `events` counts lines: every line is one thing a player sent, noisy or not, so the file has
    exactly `events` lines. Of them, about `noise` are noise (see NOISE_KINDS; GenStats.noise
    says how many of each) and the rest are clean session events (GenStats.events). Event times
    start at `start` (naive means UTC) and span about `days`; user ids are 1..users, media ids
    1..media. The same arguments always give the same bytes.
    """
    if events < 0:
        raise ValueError("events must be >= 0")
    if users < 1 or media < 1 or groups < 1:
        raise ValueError("users, media and groups must be >= 1")
    if groups > media:
        raise ValueError("groups must not exceed media")
    if not 0.0 <= noise <= 1.0:
        raise ValueError("noise must be within 0..1")
    if not days > 0:
        raise ValueError("days must be > 0")
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)

    began = time.perf_counter()
    lay = _layout(seed, media, groups)
    rng = random.Random(seed)
    stats = GenStats()
    counts = stats.noise
    span = days * 86400.0
    start_ts = float(math.floor(start.timestamp()))

    # Calibrate the visit arrival rate so that `events` lines span about `days`.
    per_session = 2.0 + lay.mean_waypoints
    per_visit = per_session / (1.0 - _CONTINUE_VISIT)
    dup_share = noise * _NOISE_WEIGHTS[NOISE_KINDS.index("duplicate")] / sum(_NOISE_WEIGHTS)
    visits = max(1.0, events * (1.0 - dup_share) / per_visit)
    visit_rate = visits / span

    fmt_dt = _DateTimes()
    kinds_cum = list(_cum(_NOISE_WEIGHTS))
    kinds_total = kinds_cum[-1]
    # Local bindings: this loop runs once per line.
    rand = rng.random
    randint = rng.randint
    pareto = rng.paretovariate
    expo = rng.expovariate
    heappush, heappop = heapq.heappush, heapq.heappop
    bis = bisect.bisect_right
    group_ids, group_cum = lay.group_ids, lay.group_cum
    global_ids, global_cum = lay.global_ids, lay.global_cum
    global_total = global_cum[-1]
    length_of = lay.length_of
    type_names = _TYPE_NAMES

    sessions: list[tuple[float, int, list[Any]]] = []  # (arrival, seq, session) heap
    active_users: set[int] = set()
    seq = 0
    next_visit = start_ts + expo(visit_rate)

    def pick_media(user: int) -> int:
        if rand() < _IN_GROUP_SHARE:
            ug = user_groups(user, seed, groups)
            g = ug[1] if len(ug) > 1 and rand() < _SECOND_GROUP_PICK else ug[0]
            cum = group_cum[g]
            return group_ids[g][bis(cum, rand() * cum[-1])]
        return global_ids[bis(global_cum, rand() * global_total)]

    def new_session(user: int, t0: int) -> list[Any]:
        # [user, media, waypoints, next step, start time, reaches the end]
        mid = pick_media(user)
        length = length_of[mid]
        watched = int(pareto(_WATCH_ALPHA))
        if watched >= length:
            return [user, mid, length, 0, t0, True]
        return [user, mid, watched, 0, t0, False]

    def next_event() -> tuple[float, int, int, int, str]:
        """The next real event by arrival: (arrival, event time, user, media, type name)."""
        nonlocal seq, next_visit
        while not sessions or next_visit <= sessions[0][0]:
            user = randint(1, users)
            # One visit per user at a time keeps each user's sessions sequential; only when
            # nearly all users are busy (tiny --users) may a user get two visits at once.
            for _ in range(8):
                if user not in active_users:
                    break
                user = randint(1, users)
            active_users.add(user)
            t0 = int(next_visit)
            seq += 1
            heappush(sessions, (t0 + rand() * _MAX_JITTER_S, seq, new_session(user, t0)))
            next_visit += expo(visit_rate)
        arrival, _, s = heappop(sessions)
        user, mid, n, k = s[0], s[1], s[2], s[3]
        t = s[4]  # this step's event time
        if k <= n:
            if k == 0:
                name = type_names[0]
                stats.sessions += 1
            else:
                name = type_names[1]
            if k == n:  # after the last waypoint the stop or end follows within 30 s
                nt = t + (
                    randint(1, WAYPOINT_SECONDS) if s[5] else randint(1, WAYPOINT_SECONDS - 1)
                )
            else:
                nt = t + WAYPOINT_SECONDS
            s[3] = k + 1
            s[4] = nt
            seq += 1
            heappush(sessions, (nt + rand() * _MAX_JITTER_S, seq, s))
            return arrival, t, user, mid, name
        name = type_names[3] if s[5] else type_names[2]
        if rand() < _CONTINUE_VISIT:  # same user, next item after a short pause
            t0 = t + randint(5, 120)
            seq += 1
            heappush(sessions, (t0 + rand() * _MAX_JITTER_S, seq, new_session(user, t0)))
        else:
            active_users.discard(user)
        return arrival, t, user, mid, name

    def clean_line(n: int, mid: int, user: int, t: int, name: str) -> str:
        # Same text as json.dumps of the dict (as used for noisy lines), without its cost.
        return (
            f'{{"EventId": "{seed}-{n}", "MediaId": {mid}, "UserId": {user}, '
            f'"Timestamp": {t}, "DateTime": "{fmt_dt(t)}", "EventType": "{name}"}}\n'
        )

    out, closers = _open_out(path)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=events, unit="ev", unit_scale=True, desc="gen", smoothing=0.1)
    chunk: list[str] = []
    ring: list[str] = []
    ring_pos = 0
    delayed: list[tuple[float, int, str]] = []  # (release arrival, seq, line) heap
    lines = clean = 0
    n_id = 0
    pending: tuple[float, int, int, int, str] | None = None
    try:
        while lines < events:
            if pending is None:
                pending = next_event()
            arrival, t, user, mid, name = pending
            if delayed and delayed[0][0] <= arrival:
                chunk.append(heappop(delayed)[2])
                counts["late"] += 1
                lines += 1
            elif noise and rand() < noise:
                kind = NOISE_KINDS[bis(kinds_cum, rand() * kinds_total)]
                if kind == "duplicate":
                    if not ring:
                        continue  # nothing to repeat yet: draw again
                    chunk.append(ring[int(rand() * len(ring))])
                    counts[kind] += 1
                    lines += 1
                    continue  # the pending event is still to be written
                n_id += 1
                pending = None
                if kind == "late":
                    if len(delayed) >= _LATE_CAP:
                        continue  # memory bound reached: this event is simply lost
                    line = clean_line(n_id, mid, user, t, name)
                    seq += 1
                    heappush(delayed, (arrival + span * rng.uniform(*_LATE_DELAY), seq, line))
                    continue
                d: dict[str, Any] = {
                    "EventId": f"{seed}-{n_id}",
                    "MediaId": mid,
                    "UserId": user,
                    "Timestamp": t,
                    "DateTime": fmt_dt(t),
                    "EventType": name,
                }
                chunk.append(_corrupt(rng, kind, d))
                counts[kind] += 1
                lines += 1
            else:
                n_id += 1
                pending = None
                line = clean_line(n_id, mid, user, t, name)
                chunk.append(line)
                if len(ring) < _DUP_RING:
                    ring.append(line)
                else:
                    ring[ring_pos] = line
                    ring_pos = (ring_pos + 1) % _DUP_RING
                clean += 1
                lines += 1
            if len(chunk) >= _CHUNK_LINES:
                out.write("".join(chunk).encode())
                chunk.clear()
                if bar is not None:
                    bar.update(lines - bar.n)
        if chunk:
            out.write("".join(chunk).encode())
        out.flush()
        if bar is not None:
            bar.update(lines - bar.n)
    finally:
        if bar is not None:
            bar.close()
        for c in closers:
            c.close()
    stats.lines = lines
    stats.events = clean
    stats.elapsed = time.perf_counter() - began
    return stats


def _cum(weights: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return out


def _corrupt(rng: random.Random, kind: str, d: dict[str, Any]) -> str:
    """One noisy line made from a real event (which is thereby lost, as in real life)."""
    if kind == "missing_field":
        key = rng.choice(("EventId", "MediaId", "UserId", "EventType", "time"))
        if key == "time":  # either time key alone would still give a valid event
            del d["Timestamp"], d["DateTime"]
        else:
            del d[key]
    elif kind == "wrong_type":
        which = rng.randrange(4)
        if which == 0:
            d["MediaId"] = "abc"
        elif which == 1:
            d["MediaId"] = d["MediaId"] + 0.5
        elif which == 2:
            d["UserId"] = f"user{d['UserId']}"
        else:
            d["UserId"] = d["UserId"] + 0.5
    elif kind == "non_positive":
        key = rng.choice(("UserId", "MediaId"))
        d[key] = rng.choice((0, -3) if key == "UserId" else (0, -1))
    elif kind == "unknown_event_type":
        d["EventType"] = rng.choice(_BAD_TYPES)
    elif kind == "time_mismatch":
        if rng.random() < 0.5:  # a time-zone bug: whole hours off
            delta = 3600 * rng.randint(1, 12)
        else:
            delta = rng.randint(2, 600)
        d["Timestamp"] += delta if rng.random() < 0.5 else -delta
    elif kind == "not_json":
        if rng.random() < 0.75:  # cut off mid-line, e.g. by a crashed upload
            text = json.dumps(d)
            return text[: rng.randint(1, len(text) - 2)] + "\n"
        return rng.choice(_GARBAGE) + "\n"
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    return json.dumps(d) + "\n"


def _parse_start(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date-time: {text!r}") from exc
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `viewevents gen`, shared by the CLI and `python -m viewevents_tools.generator`."""
    parser.add_argument("out", metavar="OUT", help="output file; .gz compresses; - is stdout")
    parser.add_argument(
        "--events",
        type=int,
        default=1_000_000,
        help="lines to write, noise included (default 1000000)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--users", type=int, default=20_000, help="user ids 1..U (default 20000)")
    parser.add_argument("--media", type=int, default=2_000, help="media ids 1..M (default 2000)")
    parser.add_argument(
        "--groups", type=int, default=20, help="planted co-viewing groups of media (default 20)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.02, help="share of noisy lines, 0..1 (default 0.02)"
    )
    parser.add_argument(
        "--start",
        type=_parse_start,
        default=DEFAULT_START,
        help="first event time, ISO 8601, naive = UTC (default 2024-01-01T00:00:00Z)",
    )
    parser.add_argument(
        "--days", type=float, default=7.0, help="days of event time the data spans (default 7)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `gen` from parsed arguments; prints a one-line summary to stderr; returns exit code."""
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        stats = generate(
            args.out,
            args.events,
            seed=args.seed,
            users=args.users,
            media=args.media,
            groups=args.groups,
            noise=args.noise,
            start=args.start,
            days=args.days,
            progress=progress,
        )
    except (ValueError, OSError) as exc:
        print(f"gen: {exc}", file=sys.stderr)
        return 2
    rate = stats.lines / stats.elapsed if stats.elapsed > 0 else float("inf")
    noise = ", ".join(f"{k}={v}" for k, v in stats.noise.items() if v)
    print(
        f"gen: wrote {stats.lines} lines to {args.out} in {stats.elapsed:.1f} s "
        f"({rate:,.0f} lines/s): {stats.events} clean events in {stats.sessions} sessions, "
        f"{stats.noise_lines} noise ({noise or 'none'})",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: python -m viewevents_tools.generator OUT --events N ..."""
    parser = argparse.ArgumentParser(
        prog="viewevents gen", description="Write a seeded synthetic legacy view-event file."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
