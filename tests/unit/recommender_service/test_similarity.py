"""Pure similarity formulas on edge cases the end-to-end tests do not reach."""

from __future__ import annotations

import math
import warnings

import numpy as np

from recommender_service import similarity as sim
from recommender_service.similarity import Metric


def test_cosine_of_an_item_without_view_time_is_undefined_and_silent() -> None:
    """A neighbour whose Q is 0 (known from a start only, its waypoints in a newer row) used to
    divide by zero: a RuntimeWarning in the log and an infinite score ranked first."""
    d = np.array([6, 5, 0], dtype=np.float64)
    q_j = np.array([9, 0, 0], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sim.cosine(d, 4, q_j)
    assert math.isclose(out[0], 6 / math.sqrt(4 * 9))
    assert np.isnan(out[1:]).all()


def test_similar_leaves_out_neighbours_without_view_time() -> None:
    neighbours = np.array([10, 11, 12], dtype=np.int64)
    d = np.array([2.0, 50.0, 4.0])
    co = np.array([2, 2, 2], dtype=np.int64)
    s_j = np.array([2, 0, 3], dtype=np.int64)
    q_j = np.array([4, 0, 9], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranked = sim.similar(
            neighbours, d, co, (3, 5), s_j, q_j, 7, Metric.COSINE, sim.Support(2), 10
        )
    # By hand: cosine = D / sqrt(Q_i Q_j) over the neighbours with Q_j > 0.
    expected = sorted(((4 / math.sqrt(45), 12), (2 / math.sqrt(20), 10)), reverse=True)
    assert ranked.ids.tolist() == [m for _, m in expected]
    assert np.allclose(ranked.scores, [s for s, _ in expected])
