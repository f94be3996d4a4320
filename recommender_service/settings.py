"""The recommender service's own settings, and its tuning resolved and validated."""

from __future__ import annotations

from dataclasses import dataclass

from viewevents import config as shared
from viewevents.config import CONSUMER_SETTINGS, SHARED_SETTINGS, Setting
from viewevents.memory import plan_memory

OWN_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "recommender_address",
        "VIEWEVENTS_RECOMMENDER_ADDRESS",
        "127.0.0.1:50053",
        str,
        "Address the recommender service listens on (bind address).",
    ),
    Setting(
        "recommender_advertised_address",
        "VIEWEVENTS_RECOMMENDER_ADVERTISED_ADDRESS",
        "",
        str,
        "Address other recommender instances use to reach this one (sent to the "
        "consumer group). Empty: the bind address, or this host's name with the bind port "
        "when the bind host is 0.0.0.0 or [::].",
    ),
    Setting(
        "recommender_state_dir",
        "VIEWEVENTS_RECOMMENDER_STATE_DIR",
        "state/recommender",
        str,
        "RocksDB directory of the recommender service.",
    ),
    Setting(
        "recommender_group",
        "VIEWEVENTS_RECOMMENDER_GROUP",
        "viewevents-recommender",
        str,
        "Kafka consumer group of the recommender service.",
    ),
    Setting(
        "recommender_history_cap",
        "VIEWEVENTS_RECOMMENDER_HISTORY_CAP",
        200,
        int,
        "Most recent items per user whose pairs are updated; older ones keep exact item "
        "sums but their pairs stop being updated (scores become approximate).",
    ),
    Setting(
        "recommender_min_co_viewers",
        "VIEWEVENTS_RECOMMENDER_MIN_CO_VIEWERS",
        2,
        int,
        "Similar items need at least this many co-viewers (1 = any co-viewer).",
    ),
    Setting(
        "recommender_shrinkage",
        "VIEWEVENTS_RECOMMENDER_SHRINKAGE",
        0.0,
        float,
        "Scores are multiplied by c / (c + shrinkage), c = co-viewers; 0 = off.",
    ),
    Setting(
        "recommender_max_limit",
        "VIEWEVENTS_RECOMMENDER_MAX_LIMIT",
        100,
        int,
        "Largest `limit` accepted by GetSimilarMedia and RecommendForUser.",
    ),
    Setting(
        "recommender_user_items",
        "VIEWEVENTS_RECOMMENDER_USER_ITEMS",
        50,
        int,
        "Most recent items of a user whose neighbour lists score RecommendForUser.",
    ),
    Setting(
        "recommender_row_max_deltas",
        "VIEWEVENTS_RECOMMENDER_ROW_MAX_DELTAS",
        32,
        int,
        "Most batch delta chunks per item row and partition before they are merged into one "
        "(bounds the chunks a query reads; the base is rewritten only once the deltas hold "
        "half of it).",
    ),
    Setting(
        "recommender_cache_items",
        "VIEWEVENTS_RECOMMENDER_CACHE_ITEMS",
        0,
        int,
        "Items whose ranked neighbour lists are kept in memory (LRU; ~6.4 kB each at the default "
        "max limit); 0: as many as the memory budget's cache share holds (3,290 at 200 MiB).",
    ),
    Setting(
        "recommender_fanout_cache_items",
        "VIEWEVENTS_RECOMMENDER_FANOUT_CACHE_ITEMS",
        -1,
        int,
        "Items whose complete neighbour lists an instance that fans out keeps, valid while no "
        "partition's offset moves (LRU; ~6.4 kB each; 0 = off); -1: as many as "
        "VIEWEVENTS_RECOMMENDER_CACHE_ITEMS, whose memory share it uses: an instance keeps one "
        "of the two caches at a time (its own lists while it owns every partition, else these).",
    ),
    Setting(
        "recommender_cache_ttl_seconds",
        "VIEWEVENTS_RECOMMENDER_CACHE_TTL_SECONDS",
        1.0,
        float,
        "While events arrive, a cached list whose item did not change is reused this long; "
        "its answer carries the older position it was computed at.",
    ),
    Setting(
        "recommender_hot_rows",
        "VIEWEVENTS_RECOMMENDER_HOT_ROWS",
        100_000,
        int,
        "User windows and item records kept in memory between batches as last committed "
        "(saves their RocksDB reads; about 130 bytes each plus 16 per window item); also "
        "bounded by recommender_hot_rows_mb.",
    ),
    Setting(
        "recommender_hot_rows_mb",
        "VIEWEVENTS_RECOMMENDER_HOT_ROWS_MB",
        0,
        int,
        "Most memory (MiB) the hot rows hold, counted per key; 0: the memory budget's "
        "side-cache share (10 MiB at 200 MiB).",
    ),
    Setting(
        "recommender_token",
        "VIEWEVENTS_RECOMMENDER_TOKEN",
        "",
        str,
        "When set, RecommenderService calls need 'authorization: Bearer <token>' metadata "
        "(health and reflection stay open).",
    ),
    Setting(
        "recommender_metrics_port",
        "VIEWEVENTS_RECOMMENDER_METRICS_PORT",
        9103,
        int,
        "Prometheus metrics HTTP port of the recommender service (0: off).",
    ),
)

SETTINGS = SHARED_SETTINGS + CONSUMER_SETTINGS + OWN_SETTINGS


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
    hot_rows: int = 100_000
    hot_rows_mb: int = 0  # 0: no byte bound (from_config resolves it from the budget)
    fanout_cache_items: int = 5_000

    def __post_init__(self) -> None:
        if self.history_cap < 2:
            raise ValueError("recommender_history_cap must be at least 2")
        if self.min_co_viewers < 1:
            raise ValueError("recommender_min_co_viewers must be at least 1")
        if self.shrinkage < 0:
            raise ValueError("recommender_shrinkage must not be negative")
        if self.max_limit < 10:
            raise ValueError("recommender_max_limit must be at least 10 (the default limit)")
        if self.hot_rows < 0:
            raise ValueError("recommender_hot_rows must not be negative")
        if self.row_max_deltas < 1 or self.user_items < 1 or self.cache_items < 1:
            raise ValueError("row_max_deltas, user_items and cache_items must be positive")
        if self.hot_rows_mb < 0:
            raise ValueError("recommender_hot_rows_mb must not be negative")
        if self.fanout_cache_items < 0:
            raise ValueError("recommender_fanout_cache_items must not be negative (0 = off)")


def cached_item_bytes(max_limit: int) -> int:
    """Memory of one cached item: two metrics' ranked lists of `max_limit` neighbours (ids,
    scores, co-viewer counts: 8 bytes each, plus numpy's ~112 bytes per array), and ~900 bytes
    of Python objects around them (the LRU slot, the entry, its dict and stamp): 6.4 kB
    measured with tracemalloc at max_limit 100."""
    return 2 * 3 * (8 * max_limit + 112) + 900


def cache_items_for(cache_mb: int, max_limit: int) -> int:
    """How many items' neighbour lists fit in `cache_mb` MiB (at least 100)."""
    return max(100, cache_mb * 1024 * 1024 // cached_item_bytes(max_limit))


def from_config(config: shared.Config | None = None) -> RecommenderSettings:
    """The recommender's settings out of the shared configuration (flags, environment, defaults);
    `cache_items` 0 means: as many as the memory budget's service-cache share holds."""
    config = shared.load(SETTINGS) if config is None else config
    values = {
        name: getattr(config, f"recommender_{name}")
        for name in RecommenderSettings.__dataclass_fields__
    }
    plan = plan_memory(config.memory_budget_mb)
    if not values["cache_items"]:
        values["cache_items"] = cache_items_for(plan.service_cache_mb, values["max_limit"])
    if not values["hot_rows_mb"]:
        values["hot_rows_mb"] = max(1, plan.side_cache_mb)
    if values["fanout_cache_items"] == -1:
        # The same share as the instance's own lists: RecommenderServicer keeps only the cache
        # of the way it currently answers (they used to split the side cache with the hot
        # rows: 493 lists at 200 MiB, fewer than a 2,000-item catalogue, so a second
        # instance's queries kept missing: GetSimilarMedia p50 6.8 -> 80 ms in the scale bench).
        values["fanout_cache_items"] = values["cache_items"]
    return RecommenderSettings(**values)
