"""The drills' brute force: what the services must hold, recomputed from the uploaded file alone.

Independent of the consumers' code: the file is parsed as the client sends it
(`event_files.iter_file`), kept when the ingest service's validation rules accept it, and the
first copy of each event id counts. Streaming, so memory grows with users x media watched, not
with the number of events: counters per media, one {media: waypoints} dict per user, and the
event ids as 64-bit hashes (a collision among a few million ids has odds of about 1e-7).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ingest_service.validation import Limits, validate_event
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.event_files import iter_file
from viewevents_tools import settings_catalogue as settings

START, WAYPOINT, STOP, END = (
    ve.EVENT_TYPE_STREAM_START,
    ve.EVENT_TYPE_WAYPOINT,
    ve.EVENT_TYPE_STREAM_STOP,
    ve.EVENT_TYPE_STREAM_END,
)
# Pair statistics are kept as dense media x media matrices: only for media ids up to this.
MAX_DENSE_MEDIA = 20_000


def uploaded_events(path: str) -> Iterator[ve.ViewEvent]:
    """The events the resumable client sends for `path`, in order (lines that are not events,
    or cannot be represented, are skipped client-side)."""
    for _, parsed in iter_file(path):
        if parsed.event is not None:
            yield parsed.event


@dataclass
class MediaTotals:
    """Expected GetMediaStats counters of one media item."""

    starts: int = 0
    waypoints: int = 0
    stops: int = 0
    ends: int = 0
    first: int = 2**63 - 1
    last: int = -(2**63)


@dataclass
class Truth:
    """Brute-force answers over the first `sent` uploaded events."""

    sent: int = 0  # events the client sends (lines parsed into events)
    valid: int = 0  # of them, valid by the ingest rules (duplicates included)
    distinct: int = 0  # of those, first copies: what consumers must count
    media: dict[int, MediaTotals] = field(default_factory=dict)
    # user -> {media: waypoints}; a 0 entry is a user seen on the media without a waypoint.
    windows: dict[int, dict[int, int]] = field(default_factory=dict)

    def unique_viewers(self) -> dict[int, int]:
        viewers: dict[int, int] = defaultdict(int)
        for items in self.windows.values():
            for media in items:
                viewers[media] += 1
        return viewers

    @property
    def users(self) -> int:
        """N: users with at least one counted event (any type)."""
        return len(self.windows)

    def item_stats(self) -> dict[int, tuple[int, int, int]]:
        """{media: (S, Q, n)}: sums of waypoints, of their squares, and users with any."""
        items: dict[int, list[int]] = {}
        for window in self.windows.values():
            for media, w in window.items():
                if w:
                    acc = items.setdefault(media, [0, 0, 0])
                    acc[0] += w
                    acc[1] += w * w
                    acc[2] += 1
        return {m: (s, q, n) for m, (s, q, n) in items.items()}

    def pair_matrices(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, c) as dense size x size matrices indexed by media id, diagonal zeroed:
        D_ij = sum over users of w_i * w_j, c_ij = users with both."""
        d = np.zeros((size, size), dtype=np.int64)
        c = np.zeros((size, size), dtype=np.int64)
        for window in self.windows.values():
            ids = np.fromiter((m for m, w in window.items() if w), dtype=np.int64)
            if len(ids) < 2:
                continue
            w = np.fromiter((w for w in window.values() if w), dtype=np.int64)
            block = np.ix_(ids, ids)
            d[block] += np.outer(w, w)
            c[block] += 1
        np.fill_diagonal(d, 0)
        np.fill_diagonal(c, 0)
        return d, c


def brute_force(
    path: str, config: settings.Config, limit: int | None = None, progress: bool = True
) -> Truth:
    """Totals of the valid first copies among the first `limit` uploaded events (all if None)."""
    limits = Limits(
        config.max_future_skew_seconds, config.max_event_age_days * 86400, config.max_event_id_bytes
    )
    now = time.time()
    truth = Truth()
    seen: set[int] = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="brute force", unit="ev", unit_scale=True, smoothing=0.1)
    media, windows = truth.media, truth.windows
    for event in uploaded_events(path):
        if limit is not None and truth.sent >= limit:
            break
        truth.sent += 1
        if bar is not None and truth.sent % 10_000 == 0:
            bar.update(10_000)
        if validate_event(event, now, limits):
            continue
        truth.valid += 1
        key = hash(event.event_id)
        if key in seen:
            continue
        seen.add(key)
        truth.distinct += 1
        totals = media.get(event.media_id)
        if totals is None:
            totals = media[event.media_id] = MediaTotals()
        kind = event.event_type
        if kind == START:
            totals.starts += 1
        elif kind == WAYPOINT:
            totals.waypoints += 1
        elif kind == STOP:
            totals.stops += 1
        elif kind == END:
            totals.ends += 1
        seconds = event.event_time.seconds
        totals.first = min(totals.first, seconds)
        totals.last = max(totals.last, seconds)
        window = windows.get(event.user_id)
        if window is None:
            window = windows[event.user_id] = {}
        window[event.media_id] = window.get(event.media_id, 0) + (kind == WAYPOINT)
    if bar is not None:
        bar.update(truth.sent % 10_000)
        bar.close()
    return truth
