"""The stats service's own settings (the shared ones are in viewevents.config)."""

from __future__ import annotations

from viewevents.config import CONSUMER_SETTINGS, SHARED_SETTINGS, Setting

OWN_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "stats_address",
        "VIEWEVENTS_STATS_ADDRESS",
        "127.0.0.1:50052",
        str,
        "Address the stats service listens on (bind address).",
    ),
    Setting(
        "stats_advertised_address",
        "VIEWEVENTS_STATS_ADVERTISED_ADDRESS",
        "",
        str,
        "Address other stats instances use to reach this one (sent to the consumer group). "
        "Empty: the bind address, or this host's name with the bind port when the bind "
        "host is 0.0.0.0 or [::]. Set it behind NAT or in containers.",
    ),
    Setting(
        "stats_state_dir",
        "VIEWEVENTS_STATS_STATE_DIR",
        "state/stats",
        str,
        "RocksDB directory of the stats service.",
    ),
    Setting(
        "stats_group",
        "VIEWEVENTS_STATS_GROUP",
        "viewevents-stats",
        str,
        "Kafka consumer group of the stats service.",
    ),
    Setting(
        "stats_trend_retention_days",
        "VIEWEVENTS_STATS_TREND_RETENTION_DAYS",
        0,
        int,
        "Days behind a partition's highest event time that still enter trend buckets "
        "(older events count in totals only); 0 = unlimited.",
    ),
    Setting(
        "stats_minute_retention_days",
        "VIEWEVENTS_STATS_MINUTE_RETENTION_DAYS",
        0,
        int,
        "Days behind a partition's highest event time after which a day's minute detail "
        "(minute buckets, minute bitmaps) is pruned; hour and day buckets and totals stay, "
        "older events enter no bucket, ranges on pruned days are rounded to hours; "
        "0 = keep forever.",
    ),
    Setting(
        "stats_max_trend_buckets",
        "VIEWEVENTS_STATS_MAX_TREND_BUCKETS",
        10_000,
        int,
        "Most buckets one GetMediaTrend may return (larger ranges get INVALID_ARGUMENT).",
    ),
    Setting(
        "stats_default_page_size",
        "VIEWEVENTS_STATS_DEFAULT_PAGE_SIZE",
        10,
        int,
        "ListTopMedia page size when limit is 0.",
    ),
    Setting(
        "stats_max_page_size",
        "VIEWEVENTS_STATS_MAX_PAGE_SIZE",
        1_000,
        int,
        "Largest ListTopMedia limit.",
    ),
    Setting(
        "stats_page_token_secret",
        "VIEWEVENTS_STATS_PAGE_TOKEN_SECRET",
        "",
        str,
        "Key that signs ListTopMedia page tokens (HMAC-SHA256). Empty: a random key per "
        "process, so tokens do not survive a restart or move between instances; set the "
        "same secret on every instance behind one address.",
    ),
    Setting(
        "heartbeat_seconds",
        "VIEWEVENTS_HEARTBEAT_SECONDS",
        30,
        int,
        "View time credited per waypoint event.",
    ),
    Setting(
        "stats_max_concurrent_scans",
        "VIEWEVENTS_STATS_MAX_CONCURRENT_SCANS",
        2,
        int,
        "GetMediaTrend and ListTopMedia calls running at once (each holds a bounded amount "
        "of memory); further calls wait their turn.",
    ),
    Setting(
        "stats_rank_chunk_rows",
        "VIEWEVENTS_STATS_RANK_CHUNK_ROWS",
        20_000,
        int,
        "About the most index rows one ListTopMedia holds at once: the ranking is merged "
        "across buckets in chunks of media ids of about this many rows.",
    ),
    Setting(
        "stats_rollup_cache_mb",
        "VIEWEVENTS_STATS_ROLLUP_CACHE_MB",
        0,
        int,
        "Memory (MiB) for the per-bucket rollups that ListTopMedia reads when this instance "
        "owns every partition (least recently used dropped first), a sixteenth of it (after "
        "the finished pages' share) for the log of changed keys that refreshes them; 0: the "
        "memory budget's service-cache share (20 MiB at 200); -1: no rollups, every ranking "
        "scans the index.",
    ),
    Setting(
        "stats_top_page_cache_kb",
        "VIEWEVENTS_STATS_TOP_PAGE_CACHE_KB",
        -1,
        int,
        "Memory (KiB) for finished ListTopMedia pages, reused only while no partition's "
        "applied offset has moved (exact; every applied batch drops them all); taken out of "
        "the rollup cache's memory, at most half of it. -1: a sixteenth of the rollup cache; "
        "0: off.",
    ),
    Setting(
        "stats_token",
        "VIEWEVENTS_STATS_TOKEN",
        "",
        str,
        "When set, StatsService calls need 'authorization: Bearer <token>' metadata "
        "(health and reflection stay open).",
    ),
    Setting(
        "stats_metrics_port",
        "VIEWEVENTS_STATS_METRICS_PORT",
        9102,
        int,
        "Prometheus metrics HTTP port of the stats service (0: off).",
    ),
)

SETTINGS = SHARED_SETTINGS + CONSUMER_SETTINGS + OWN_SETTINGS
