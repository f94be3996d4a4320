"""Offline leave-one-out evaluation: python -m evaluation.recommender [--events N ...].

On generated data (viewevents_tools.generator: planted co-viewing groups, power-law popularity), each user's
last watched item (the one whose first waypoint is latest) is hidden: all that user's events on
it are removed, the rest is folded into the statistics by the service's own processor
(evaluation.offline_recommender: same validity filter, de-duplication, Processor.apply and
QueryEngine as the service, without Kafka), and 10 items are recommended from the remaining
history. A hit is the hidden item among the 10; NDCG@10 credits a hit at rank r with
1 / log2(r + 1). The baseline is the service's own fallback, the most watched unwatched items.
Because support rules act at query time only, one set of statistics serves every row.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from evaluation.offline_recommender import OfflineRecommender
from recommender_service import similarity as sim
from recommender_service.query_engine import QueryEngine
from recommender_service.settings import RecommenderSettings
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client import event_files
from viewevents_tools import generator

K = 10


@dataclass
class Score:
    """Hit-rate@10 and NDCG@10 of one method."""

    name: str
    users: int = 0
    hits: int = 0
    ndcg: float = 0.0
    fallbacks: int = 0

    def add(self, recommended: list[int], hidden: int, fallback: bool = False) -> None:
        self.users += 1
        self.fallbacks += fallback
        if hidden in recommended:
            self.hits += 1
            self.ndcg += 1.0 / math.log2(recommended.index(hidden) + 2)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.users if self.users else 0.0

    @property
    def ndcg_at_k(self) -> float:
        return self.ndcg / self.users if self.users else 0.0


def split(events: Iterable[ve.ViewEvent]) -> tuple[list[ve.ViewEvent], dict[int, int]]:
    """(training events, {user: hidden item}) for users with at least two watched items."""
    kept = list(events)
    first_waypoint: dict[tuple[int, int], tuple[int, int]] = {}
    for event in kept:
        if event.event_type == ve.EVENT_TYPE_WAYPOINT:
            key = (event.user_id, event.media_id)
            stamp = (event.event_time.seconds, event.event_time.nanos)
            if key not in first_waypoint or stamp < first_waypoint[key]:
                first_waypoint[key] = stamp
    latest: dict[int, tuple[tuple[int, int], int]] = {}
    watched: dict[int, int] = {}
    for (user, media), stamp in first_waypoint.items():
        watched[user] = watched.get(user, 0) + 1
        if user not in latest or (stamp, media) > latest[user]:
            latest[user] = (stamp, media)
    hidden = {u: m for u, (_, m) in latest.items() if watched[u] >= 2}
    training = [e for e in kept if hidden.get(e.user_id) != e.media_id]
    return training, hidden


def evaluate(
    events: list[ve.ViewEvent],
    configs: dict[str, RecommenderSettings],
    max_users: int = 0,
    progress: bool = False,
) -> list[Score]:
    training, hidden = split(events)
    users = sorted(hidden)
    if max_users and len(users) > max_users:
        users = sorted(np.random.default_rng(0).choice(users, max_users, replace=False).tolist())
    scores: list[Score] = []
    base_settings = next(iter(configs.values()))
    with tempfile.TemporaryDirectory(prefix="recommender-eval-") as path:
        offline = OfflineRecommender(path, base_settings)
        offline.feed(training)
        view = offline.processor.view
        baseline = Score("most watched (baseline)")
        for user in users:
            history = offline.engine.history(view, user)
            watched = history.watched if history else np.zeros(0, np.int64)
            ids, _ = sim.most_watched(view.popular_order(), view.ids, view.n, watched, K)
            baseline.add(ids.tolist(), hidden[user], True)
        scores.append(baseline)
        for name, settings in configs.items():
            engine = QueryEngine(lambda: offline.processor.view, settings)
            engine.warm(view)
            score = Score(name)
            iterator: Iterable[int] = users
            if progress:
                from tqdm import tqdm

                iterator = tqdm(users, desc=name, unit="user", leave=False)
            for user in iterator:
                result = engine.recommend(user, K)
                score.add(result.ids.tolist(), hidden[user], result.fallback)
            scores.append(score)
        offline.close()
    return scores


def table(scores: list[Score]) -> str:
    width = max(len(s.name) for s in scores)
    lines = [
        f"{'method':<{width}} {'users':>7} {'hit-rate@10':>12} {'NDCG@10':>9} {'fallbacks':>10}"
    ]
    for s in scores:
        lines.append(
            f"{s.name:<{width}} {s.users:>7} {s.hit_rate:>12.4f} {s.ndcg_at_k:>9.4f} "
            f"{s.fallbacks:>10}"
        )
    return "\n".join(lines)


def default_configs(defaults: RecommenderSettings) -> dict[str, RecommenderSettings]:
    """The service defaults plus the support variants the default was chosen among."""
    from dataclasses import replace

    out = {
        f"item-item cosine (defaults: min co-viewers {defaults.min_co_viewers}, "
        f"shrinkage {defaults.shrinkage:g})": defaults
    }
    for min_co, shrink in [(1, 0.0), (2, 0.0), (3, 0.0), (1, 5.0), (2, 10.0), (2, 20.0)]:
        if (min_co, shrink) != (defaults.min_co_viewers, defaults.shrinkage):
            out[f"  min co-viewers {min_co}, shrinkage {shrink:g}"] = replace(
                defaults, min_co_viewers=min_co, shrinkage=shrink
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="evaluation.recommender",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="generated lines")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--media", type=int, default=2_000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-users", type=int, default=0, help="evaluate a sample (0 = all)")
    args = parser.parse_args(argv)
    from recommender_service import settings as recommender_settings

    defaults = recommender_settings.from_config()
    started = time.monotonic()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as data:
        generator.generate(
            data.name,
            args.events,
            seed=args.seed,
            users=args.users,
            media=args.media,
            groups=args.groups,
            noise=0.0,
        )
        events = [p.event for _, p in event_files.iter_file(data.name) if p.event is not None]
    print(
        f"leave-one-out on {len(events):,} generated events: {args.users:,} users, "
        f"{args.media:,} media, {args.groups} planted groups, seed {args.seed}"
    )
    scores = evaluate(events, default_configs(defaults), args.max_users, progress=True)
    print(table(scores))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
