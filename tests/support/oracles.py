"""Brute-force oracles: answers recomputed from the raw events, never by the services' code."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pytest

from recommender_service.similarity import Metric
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2
from viewevents.v1 import view_event_pb2 as ve

HEARTBEAT = 30  # seconds of view time per waypoint


# The stats service.


class Expected:
    """Brute-force answers over accepted events (no retention cut-off: the default)."""

    def __init__(self, events: list[view_event_pb2.ViewEvent]) -> None:
        self.rows = [(e.media_id, e.user_id, e.event_type, e.event_time.seconds) for e in events]
        self.by_media: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
        for row in self.rows:
            self.by_media[row[0]].append(row)

    def totals(self, media: int) -> tuple:
        rows = self.by_media[media]
        starts = sum(r[2] == 1 for r in rows)
        ends = sum(r[2] == 4 for r in rows)
        view_time = HEARTBEAT * sum(r[2] == 2 for r in rows)
        viewers = len({r[1] for r in rows})
        return (
            view_time,
            starts,
            sum(r[2] == 3 for r in rows),
            ends,
            viewers,
            ends / starts if starts else 0.0,
            view_time / viewers,
            min(r[3] for r in rows),
            max(r[3] for r in rows),
        )

    def trend(self, media: int, size: int, start: int, end: int) -> tuple[list[tuple], int]:
        buckets: dict[int, list] = {}
        users = set()
        for _, user, kind, seconds in self.by_media[media]:
            if start <= seconds < end:
                b = buckets.setdefault(seconds - seconds % size, [0, 0, 0, 0, set()])
                b[0] += HEARTBEAT * (kind == 2)
                b[1] += kind == 1
                b[2] += kind == 3
                b[3] += kind == 4
                b[4].add(user)
                users.add(user)
        return [(s, *b[:4], len(b[4])) for s, b in sorted(buckets.items())], len(users)

    def top(self, start: int, end: int, metric: pb.TopMediaMetric) -> list[tuple]:
        acc: dict[int, list] = defaultdict(lambda: [0, 0, set()])
        for media, user, kind, seconds in self.rows:
            if start <= seconds < end:
                acc[media][0] += HEARTBEAT * (kind == 2)
                acc[media][1] += kind == 1
                acc[media][2].add(user)
        column = {
            pb.TOP_MEDIA_METRIC_VIEW_TIME: 0,
            pb.TOP_MEDIA_METRIC_STARTS: 1,
            pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS: 2,
        }[metric]
        values = {m: (v, s, len(u)) for m, (v, s, u) in acc.items()}
        order = sorted(values, key=lambda m: (-values[m][column], m))
        return [(m, i + 1, *values[m]) for i, m in enumerate(order)]


def check_all_totals(stub: pb_grpc.StatsServiceStub, expected: Expected) -> None:
    for media in sorted(expected.by_media):
        s = stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=media), timeout=10).stats
        got = (
            s.view_time_seconds,
            s.starts,
            s.stops,
            s.ends,
            s.unique_viewers,
            s.completion_rate,
            s.average_view_time_seconds_per_viewer,
            s.first_event_time.seconds,
            s.last_event_time.seconds,
        )
        assert got == pytest.approx(expected.totals(media)), media


class StatsBounds:
    """Brute force per partition: what an answer whose position lists offsets must at least
    hold (every first copy below those offsets) and may at most hold (everything)."""

    def __init__(self, records: list[tuple[int, int, ve.ViewEvent]]) -> None:
        # media -> [(partition, offset, event)], first copies only, in offset order.
        self.by_media: dict[int, list[tuple[int, int, ve.ViewEvent]]] = defaultdict(list)
        seen: set[str] = set()
        for partition, offset, event in sorted(records, key=lambda r: (r[0], r[1])):
            if event.event_id not in seen:
                seen.add(event.event_id)
                self.by_media[event.media_id].append((partition, offset, event))

    def totals(self, media: int, offsets: dict[int, int] | None) -> tuple[int, int, int]:
        rows = [e for p, o, e in self.by_media[media] if offsets is None or o < offsets.get(p, 0)]
        return (
            sum(e.event_type == 1 for e in rows),
            HEARTBEAT * sum(e.event_type == 2 for e in rows),
            len({e.user_id for e in rows}),
        )


# The recommender.

REL = 1e-9
ABS = 1e-12  # float64 noise of a correlation near 0 (both sides round N*D - S_i*S_j)


class BruteForce:
    """Similarities from the full user x item matrix, recomputed from scratch."""

    def __init__(self, events: Iterable[ve.ViewEvent]) -> None:
        first: dict[str, ve.ViewEvent] = {}
        for event in events:
            first.setdefault(event.event_id, event)
        self.users = sorted({e.user_id for e in first.values()})
        self.items = sorted({e.media_id for e in first.values()})
        self.col = {m: k for k, m in enumerate(self.items)}
        row = {u: k for k, u in enumerate(self.users)}
        self.w = np.zeros((len(self.users), len(self.items)))
        for event in first.values():
            if event.event_type == ve.EVENT_TYPE_WAYPOINT:
                self.w[row[event.user_id], self.col[event.media_id]] += 1
        self.row = row
        watched = (self.w > 0).astype(np.float64)
        self.d = self.w.T @ self.w
        self.c = watched.T @ watched
        norms = np.sqrt((self.w * self.w).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            self.cos = self.d / np.outer(norms, norms)
            self.pearson = np.corrcoef(self.w, rowvar=False) if len(self.users) > 1 else None

    @property
    def n_users(self) -> int:
        return len(self.users)

    def item_stats(self) -> dict[int, tuple[int, int, int]]:
        return {
            m: (
                int(self.w[:, k].sum()),
                int((self.w[:, k] ** 2).sum()),
                int((self.w[:, k] > 0).sum()),
            )
            for m, k in self.col.items()
        }

    def pairs(self) -> dict[tuple[int, int], tuple[int, int]]:
        out = {}
        for a, i in enumerate(self.items):
            for b in np.flatnonzero(self.c[a] > 0):
                if b != a:
                    out[(i, self.items[b])] = (int(self.d[a, b]), int(self.c[a, b]))
        return out

    def scores(
        self, item: int, metric: Metric, min_co: int = 1, shrinkage: float = 0.0
    ) -> dict[int, tuple[float, int]]:
        """{neighbour: (score, co-viewers)} for every neighbour with enough support."""
        a = self.col[item]
        matrix = self.cos if metric is Metric.COSINE else self.pearson
        out = {}
        for b, j in enumerate(self.items):
            co = int(self.c[a, b])
            if b == a or co < max(1, min_co):
                continue
            assert isinstance(matrix, np.ndarray), "Pearson needs at least two users"
            score = float(matrix[a, b])
            if math.isnan(score):
                continue
            if shrinkage > 0:
                score *= co / (co + shrinkage)
            out[j] = (score, co)
        return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


def assert_same_ranking(
    ids: list[int],
    scores: list[float],
    co: list[int],
    expected: dict[int, tuple[float, int]],
    limit: int,
) -> None:
    """Scores and co-viewers match; the order is by score, exact ties by media id; and the
    returned set is the brute-force top `limit` (up to ties at the cut)."""
    for media, score, viewers in zip(ids, scores, co):
        assert media in expected, f"{media} should not be listed"
        assert close(score, expected[media][0]), (media, score, expected[media][0])
        assert viewers == expected[media][1], (media, viewers, expected[media][1])
    for a, b in zip(ids, ids[1:]):
        sa, sb = expected[a][0], expected[b][0]
        assert sa > sb or (close(sa, sb) and a < b), f"{a} ({sa!r}) ranked before {b} ({sb!r})"
    want = sorted(expected, key=lambda m: (-expected[m][0], m))[:limit]
    assert len(ids) == len(want)
    for got, exp in zip(ids, want):
        assert got == exp or close(expected[got][0], expected[exp][0]), (got, exp)
    if len(expected) > len(ids) and ids:
        cut = expected[ids[-1]][0]
        for media, (score, _) in expected.items():
            if media not in ids:
                assert score < cut or close(score, cut), f"{media} ({score}) missing above the cut"


class CoViewerBounds:
    """Brute force per partition for the recommender: an answer whose position lists offsets
    must count at least the co-viewers of the first copies below those offsets, and at most
    those of everything (co-viewer counts only grow)."""

    def __init__(self, records: list[tuple[int, int, ve.ViewEvent]]) -> None:
        seen: set[str] = set()
        # media -> {user: (partition, offset) of the user's first waypoint on it}
        self.first: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)
        for partition, offset, event in sorted(records, key=lambda r: (r[0], r[1])):
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            if event.event_type == ve.EVENT_TYPE_WAYPOINT:
                self.first[event.media_id].setdefault(event.user_id, (partition, offset))

    def co_viewers(self, i: int, j: int, offsets: dict[int, int] | None = None) -> int:
        a, b = self.first[i], self.first[j]

        def below(where: tuple[int, int]) -> bool:
            return offsets is None or where[1] < offsets.get(where[0], 0)

        return sum(1 for user in a.keys() & b.keys() if below(a[user]) and below(b[user]))
