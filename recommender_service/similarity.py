"""Similarity formulas, support rules, ranking and user scoring: pure numpy, no I/O.

With w_ui a user's view time on item i (missing = 0), N users seen, and per item S_i = sum w_ui,
Q_i = sum w_ui^2, per pair D_ij = sum w_ui w_uj and c_ij co-viewers:
    cosine(i, j)  = D_ij / sqrt(Q_i Q_j)
    pearson(i, j) = (N D_ij - S_i S_j) / sqrt((N Q_i - S_i^2) (N Q_j - S_j^2))
Pearson is the correlation over all N users (the legacy pandas measure); it is undefined when an
item has no variance (every user watched it for the same time) and such pairs are left out.
Optional support rules: pairs with c_ij < min_co_viewers are dropped, and with shrinkage
lambda > 0 a score is multiplied by c_ij / (c_ij + lambda).
Ranking: best score first; scores equal to 12 decimals are ties, broken by the smaller media id,
so float noise (1e-16) can never reorder items whose exact scores are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

TIE_DECIMALS = 12


class Metric(Enum):
    COSINE = 1
    PEARSON = 2


@dataclass(frozen=True)
class Ranked:
    """A ranked list: media ids with their scores and co-viewer counts, best first."""

    ids: np.ndarray
    scores: np.ndarray
    co_viewers: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays' data (not numpy's per-array headers)."""
        return self.ids.nbytes + self.scores.nbytes + self.co_viewers.nbytes

    def head(self, limit: int) -> Ranked:
        return Ranked(self.ids[:limit], self.scores[:limit], self.co_viewers[:limit])

    @classmethod
    def empty(cls) -> Ranked:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64))


@dataclass(frozen=True)
class Support:
    """Minimum co-viewers and shrinkage, applied to both metrics."""

    min_co_viewers: int = 1
    shrinkage: float = 0.0


def cosine(d: np.ndarray, q_i: float, q_j: np.ndarray) -> np.ndarray:
    """NaN where an item has no view time yet (Q = 0): e.g. a neighbour known from a start
    event whose waypoints land in a row newer than the view. Dividing there would warn and
    rank an infinite score first."""
    norms = float(q_i) * q_j.astype(np.float64)
    defined = norms > 0
    out = np.full(len(norms), np.nan)
    out[defined] = np.asarray(d, np.float64)[defined] / np.sqrt(norms[defined])
    return out


def pearson(
    d: np.ndarray, s_i: float, s_j: np.ndarray, q_i: float, q_j: np.ndarray, users: int
) -> np.ndarray:
    """Correlation over `users` users, missing view time = 0; NaN where undefined."""
    n = float(users)
    s_j = s_j.astype(np.float64)
    var_i = n * float(q_i) - float(s_i) * float(s_i)
    var_j = n * q_j.astype(np.float64) - s_j * s_j
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (n * d - float(s_i) * s_j) / np.sqrt(var_i * var_j)
    out[~((var_j > 0) & (var_i > 0))] = np.nan
    return np.asarray(out, np.float64)


def apply_support(scores: np.ndarray, co: np.ndarray, support: Support) -> np.ndarray:
    """Scores with shrinkage applied and NaN where the pair lacks support."""
    out = scores.astype(np.float64, copy=True)
    if support.shrinkage > 0:
        out *= co / (co + support.shrinkage)
    out[co < support.min_co_viewers] = np.nan
    return out


def rank(ids: np.ndarray, scores: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the best `limit` entries: score descending (ties to 12 decimals), then id
    ascending; NaN scores are left out."""
    valid = np.flatnonzero(~np.isnan(scores))
    if len(valid) == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    key = -np.round(scores[valid], TIE_DECIMALS)
    if len(valid) > limit:
        kth = np.partition(key, limit - 1)[limit - 1]
        keep = key <= kth
        valid, key = valid[keep], key[keep]
    order = np.lexsort((ids[valid], key))[:limit]
    return valid[order]


def similar(
    neighbours: np.ndarray,
    d: np.ndarray,
    co: np.ndarray,
    item: tuple[int, int],
    s_j: np.ndarray,
    q_j: np.ndarray,
    users: int,
    metric: Metric,
    support: Support,
    limit: int,
) -> Ranked:
    """Rank an item's neighbours. `item` is (S_i, Q_i); arrays are aligned per neighbour."""
    s_i, q_i = item
    if len(neighbours) == 0 or q_i <= 0:
        return Ranked.empty()
    if metric is Metric.COSINE:
        raw = cosine(d, q_i, q_j)
    else:
        raw = pearson(d, s_i, s_j, q_i, q_j, users)
    scores = apply_support(raw, co, support)
    top = rank(neighbours, scores, limit)
    return Ranked(neighbours[top], scores[top], co[top].astype(np.int64))


def recommend(
    lists: list[Ranked], weights: list[float], exclude: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Score candidates from the neighbour lists of a user's items.

    score(c) = sum over the user's items w whose list holds c of weight_w * sim(w, c), divided
    by the sum of *all* the user's weights: a view-time-weighted similarity on a 0..1 scale per
    user (the divisor is the same for every candidate, so it does not change the ranking).
    Items in `exclude` (already watched) are left out. Returns (ids, scores), best first, ties
    by media id."""
    total = float(sum(weights))
    if not lists or total <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    ids = np.concatenate([r.ids for r in lists])
    contrib = np.concatenate([r.scores * w for r, w in zip(lists, weights)])
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    order = np.argsort(ids, kind="stable")
    ids, contrib = ids[order], contrib[order]
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    unique = ids[starts]
    scores = np.add.reduceat(contrib, starts) / total
    if len(exclude):
        where = np.searchsorted(unique, exclude)
        hit = where < len(unique)
        hit[hit] = unique[where[hit]] == exclude[hit]
        scores[where[hit]] = np.nan  # already watched
    scores[scores <= 0] = np.nan  # no positive evidence is not a recommendation
    top = rank(unique, scores, limit)
    return unique[top], scores[top]


def most_watched(
    order: np.ndarray, ids: np.ndarray, n: np.ndarray, exclude: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` items of a popularity order (viewers, then view time, then id) that
    are not excluded and have viewers; scores are viewer counts."""
    picked: list[int] = []
    excluded = set(exclude.tolist())
    for k in order[: limit + len(excluded)].tolist():
        if n[k] <= 0:
            break
        if int(ids[k]) in excluded:
            continue
        picked.append(k)
        if len(picked) == limit:
            break
    idx = np.asarray(picked, dtype=np.int64)
    return ids[idx], n[idx].astype(np.float64)
