"""The recommender's tuning, validated; the settings themselves live in viewevents/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from viewevents import config as shared


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


def from_config(config: shared.Config | None = None) -> RecommenderSettings:
    """The recommender's settings out of the shared configuration (flags, environment, defaults)."""
    config = shared.load(env=None) if config is None else config
    return RecommenderSettings(**{
        name.removeprefix("recommender_"): getattr(config, name)
        for name in shared.setting_names() if name.startswith("recommender_")
        and name.removeprefix("recommender_") in RecommenderSettings.__dataclass_fields__})
