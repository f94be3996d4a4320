"""The recommender's own settings, until they move into viewevents/config.py.

Each is read from the shared Config when it defines it (the intended final home), else from its
command-line flag, else its environment variable, else its default: the same precedence as
every other setting, so moving them into config.py later changes nothing for users.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from viewevents import config as shared
from viewevents.config import Setting

SETTINGS: tuple[Setting, ...] = (
    Setting("recommender_history_cap", "VIEWEVENTS_RECOMMENDER_HISTORY_CAP", 200, int,
            "Most recent items per user whose pairs are updated; older ones keep exact item "
            "sums but their pairs stop being updated (scores become approximate)."),
    Setting("recommender_min_co_viewers", "VIEWEVENTS_RECOMMENDER_MIN_CO_VIEWERS", 2, int,
            "Similar items need at least this many co-viewers (1 = any co-viewer)."),
    Setting("recommender_shrinkage", "VIEWEVENTS_RECOMMENDER_SHRINKAGE", 0.0, float,
            "Scores are multiplied by c / (c + shrinkage), c = co-viewers; 0 = off."),
    Setting("recommender_max_limit", "VIEWEVENTS_RECOMMENDER_MAX_LIMIT", 100, int,
            "Largest `limit` accepted by GetSimilarMedia and RecommendForUser."),
    Setting("recommender_user_items", "VIEWEVENTS_RECOMMENDER_USER_ITEMS", 50, int,
            "Most recent items of a user whose neighbour lists score RecommendForUser."),
    Setting("recommender_row_max_deltas", "VIEWEVENTS_RECOMMENDER_ROW_MAX_DELTAS", 32, int,
            "Most batch delta chunks per item row and partition before they are compacted into "
            "its base (bounds the chunks a query reads)."),
    Setting("recommender_cache_items", "VIEWEVENTS_RECOMMENDER_CACHE_ITEMS", 20_000, int,
            "Items whose ranked neighbour lists are kept in memory (LRU; ~5 kB each)."),
    Setting("recommender_cache_ttl_seconds", "VIEWEVENTS_RECOMMENDER_CACHE_TTL_SECONDS", 1.0, float,
            "While events arrive, a cached list whose item did not change is reused this long; "
            "its answer carries the older position it was computed at."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class RecommenderSettings:
    """Resolved recommender settings."""

    history_cap: int = 200
    min_co_viewers: int = 2
    shrinkage: float = 0.0
    max_limit: int = 100
    user_items: int = 50
    row_max_deltas: int = 32
    cache_items: int = 20_000
    cache_ttl_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.history_cap < 2:
            raise ValueError("recommender_history_cap must be at least 2")
        if self.min_co_viewers < 1:
            raise ValueError("recommender_min_co_viewers must be at least 1")
        if self.shrinkage < 0:
            raise ValueError("recommender_shrinkage must not be negative")
        if self.max_limit < 10:
            raise ValueError("recommender_max_limit must be at least 10 (the default limit)")
        if self.row_max_deltas < 1 or self.user_items < 1 or self.cache_items < 1:
            raise ValueError("row_max_deltas, user_items and cache_items must be positive")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the settings config.py does not define yet."""
    names = {s.name for s in shared.SETTINGS}
    for setting in SETTINGS:
        if setting.name not in names:
            parser.add_argument(
                setting.flag, dest=setting.name, default=None, type=setting.kind,
                help=f"{setting.help} Env {setting.env}; default {setting.default!r}.")


def resolve(
    config: shared.Config | None = None,
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
) -> RecommenderSettings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = getattr(config, setting.name, None) if config is not None else None
        if value is None and args is not None:
            value = getattr(args, setting.name, None)
        if value is None and setting.env in env:
            value = setting.kind(env[setting.env])
        if value is None:
            value = setting.default
        values[setting.name.removeprefix("recommender_")] = value
    return RecommenderSettings(**values)
