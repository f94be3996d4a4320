"""Every setting of every service, in one place: name, environment variable, default, help.

A setting is read from its command-line flag, else its environment variable, else its default,
so the same names work in a shell, in `make run` and in docker-compose.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One configurable value; `flag` is derived from `name` (kafka_bootstrap -> --kafka-bootstrap)."""

    name: str
    env: str
    default: Any
    kind: Callable[[str], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


SETTINGS: tuple[Setting, ...] = (
    # Kafka, shared by all services.
    Setting("kafka_bootstrap", "VIEWEVENTS_KAFKA_BOOTSTRAP", "127.0.0.1:9092", str,
            "Kafka bootstrap servers (host:port[,host:port])."),
    Setting("view_topic", "VIEWEVENTS_VIEW_TOPIC", "view-events", str,
            "Topic of accepted view events (key: user_id as decimal text; value: ViewEvent)."),
    Setting("dead_letter_topic", "VIEWEVENTS_DEAD_LETTER_TOPIC", "view-events-dead-letter", str,
            "Topic of rejected events with their reasons (value: RejectedEvent)."),
    Setting("topic_partitions", "VIEWEVENTS_TOPIC_PARTITIONS", 4, int,
            "Partitions of the topics when the ingest service creates them."),
    # Ingest service.
    Setting("ingest_address", "VIEWEVENTS_INGEST_ADDRESS", "127.0.0.1:50051", str,
            "Address the ingest service listens on."),
    Setting("max_request_bytes", "VIEWEVENTS_MAX_REQUEST_BYTES", 8 * 1024 * 1024, int,
            "Largest gRPC request accepted (bigger ones get RESOURCE_EXHAUSTED)."),
    Setting("max_events_per_request", "VIEWEVENTS_MAX_EVENTS_PER_REQUEST", 10_000, int,
            "Most events in one request (more gets RESOURCE_EXHAUSTED)."),
    Setting("max_future_skew_seconds", "VIEWEVENTS_MAX_FUTURE_SKEW_SECONDS", 300, int,
            "Event times further than this in the future are rejected."),
    Setting("max_event_age_days", "VIEWEVENTS_MAX_EVENT_AGE_DAYS", 3650, int,
            "Event times older than this are rejected."),
    Setting("max_rejections_reported", "VIEWEVENTS_MAX_REJECTIONS_REPORTED", 100, int,
            "How many rejections an UploadSummary lists (all are counted and dead-lettered)."),
    Setting("max_inflight_batches", "VIEWEVENTS_MAX_INFLIGHT_BATCHES", 64, int,
            "Kafka batches an upload may have unacknowledged before it stops reading the stream."),
    Setting("producer_linger_ms", "VIEWEVENTS_PRODUCER_LINGER_MS", 5, int,
            "Producer linger (ms) before a partly filled batch is sent."),
    Setting("producer_batch_bytes", "VIEWEVENTS_PRODUCER_BATCH_BYTES", 512 * 1024, int,
            "Producer batch size in bytes."),
    Setting("producer_timeout_ms", "VIEWEVENTS_PRODUCER_TIMEOUT_MS", 30_000, int,
            "How long Kafka may take to acknowledge a batch before the RPC fails UNAVAILABLE."),
    # Stats service.
    Setting("stats_address", "VIEWEVENTS_STATS_ADDRESS", "127.0.0.1:50052", str,
            "Address the stats service listens on."),
    Setting("stats_state_dir", "VIEWEVENTS_STATS_STATE_DIR", "state/stats", str,
            "RocksDB directory of the stats service."),
    Setting("stats_group", "VIEWEVENTS_STATS_GROUP", "viewevents-stats", str,
            "Kafka consumer group of the stats service."),
    Setting("stats_trend_retention_days", "VIEWEVENTS_STATS_TREND_RETENTION_DAYS", 0, int,
            "Days behind a partition's highest event time that still enter trend buckets "
            "(older events count in totals only); 0 = unlimited."),
    Setting("stats_max_trend_buckets", "VIEWEVENTS_STATS_MAX_TREND_BUCKETS", 10_000, int,
            "Most buckets one GetMediaTrend may return (larger ranges get INVALID_ARGUMENT)."),
    Setting("stats_default_page_size", "VIEWEVENTS_STATS_DEFAULT_PAGE_SIZE", 10, int,
            "ListTopMedia page size when limit is 0."),
    Setting("stats_max_page_size", "VIEWEVENTS_STATS_MAX_PAGE_SIZE", 1_000, int,
            "Largest ListTopMedia limit."),
    # Recommender service.
    Setting("recommender_address", "VIEWEVENTS_RECOMMENDER_ADDRESS", "127.0.0.1:50053", str,
            "Address the recommender service listens on."),
    Setting("recommender_state_dir", "VIEWEVENTS_RECOMMENDER_STATE_DIR", "state/recommender", str,
            "RocksDB directory of the recommender service."),
    Setting("recommender_group", "VIEWEVENTS_RECOMMENDER_GROUP", "viewevents-recommender", str,
            "Kafka consumer group of the recommender service."),
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
    # Consumers and state (stats and recommender).
    Setting("heartbeat_seconds", "VIEWEVENTS_HEARTBEAT_SECONDS", 30, int,
            "View time credited per waypoint event."),
    Setting("consume_batch_max", "VIEWEVENTS_CONSUME_BATCH_MAX", 20_000, int,
            "Most records applied in one RocksDB write batch."),
    Setting("dedupe_retention_days", "VIEWEVENTS_DEDUPE_RETENTION_DAYS", 30, int,
            "How long consumers remember an event id to drop its duplicates."),
    Setting("rocksdb_cache_mb", "VIEWEVENTS_ROCKSDB_CACHE_MB", 128, int,
            "RocksDB block cache size (MiB): bounds read memory."),
    Setting("rocksdb_write_buffer_mb", "VIEWEVENTS_ROCKSDB_WRITE_BUFFER_MB", 32, int,
            "RocksDB memtable size (MiB); at most 3 are kept."),
    # Every service.
    Setting("ingest_metrics_port", "VIEWEVENTS_INGEST_METRICS_PORT", 9101, int,
            "Prometheus metrics HTTP port of the ingest service (0: off)."),
    Setting("stats_metrics_port", "VIEWEVENTS_STATS_METRICS_PORT", 9102, int,
            "Prometheus metrics HTTP port of the stats service (0: off)."),
    Setting("recommender_metrics_port", "VIEWEVENTS_RECOMMENDER_METRICS_PORT", 9103, int,
            "Prometheus metrics HTTP port of the recommender service (0: off)."),
    Setting("tls_cert_file", "VIEWEVENTS_TLS_CERT_FILE", "", str,
            "PEM certificate chain: when set (with the key), every gRPC port serves TLS only."),
    Setting("tls_key_file", "VIEWEVENTS_TLS_KEY_FILE", "", str,
            "PEM private key of the TLS certificate."),
    Setting("ingest_token", "VIEWEVENTS_INGEST_TOKEN", "", str,
            "When set, IngestService calls need 'authorization: Bearer <token>' metadata."),
    Setting("log_level", "VIEWEVENTS_LOG_LEVEL", "INFO", str, "Log level."),
    Setting("log_json", "VIEWEVENTS_LOG_JSON", False, _bool, "Log as JSON lines."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Config:
    """Resolved settings; attribute access by setting name (config.kafka_bootstrap)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> Config:
        unknown = set(changes) - set(_BY_NAME)
        if unknown:
            raise KeyError(f"unknown settings: {sorted(unknown)}")
        return Config({**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def setting_names() -> list[str]:
    return [s.name for s in SETTINGS]


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Add one flag per setting; the default shown is the environment's value if set."""
    for setting in SETTINGS if names is None else [_BY_NAME[n] for n in names]:
        parser.add_argument(
            setting.flag, dest=setting.name, default=None, type=setting.kind,
            help=f"{setting.help} Env {setting.env}; default {setting.default!r}.",
        )


def load(args: argparse.Namespace | None = None, env: dict[str, str] | None = None) -> Config:
    """Resolve every setting: flag, else environment variable, else default."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flag_value = getattr(args, setting.name, None) if args is not None else None
        if flag_value is not None:
            values[setting.name] = flag_value
        elif setting.env in env:
            values[setting.name] = setting.kind(env[setting.env])
        else:
            values[setting.name] = setting.default
    return Config(values)


def to_environment(config: Config, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that give a child process exactly `config` (on top of `base`,
    by default this process's environment)."""
    env = dict(os.environ if base is None else base)
    for setting in SETTINGS:
        value = getattr(config, setting.name)
        env[setting.env] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def markdown_table() -> str:
    """The settings as the Markdown table of docs/operations.md (`python -m viewevents.config`)."""
    lines = ["| environment variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = s.default if s.default != "" else "(empty)"
        lines.append(f"| `{s.env}` | `{s.flag}` | `{default}` | {s.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())


def run_service(prog: str, service: str, description: str | None,
                serve: Callable[[Config], Any], argv: Sequence[str] | None = None) -> None:
    """The `main()` of every service: flags and environment, logging, then `serve(config)`."""
    import asyncio
    import signal
    import sys

    from viewevents.logs import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_flags(parser)
    config = load(parser.parse_args(argv))
    setup_logging(service, config.log_level, config.log_json)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        # Shutdown is done (or under way in worker threads that must finish their batch): a
        # second SIGTERM, e.g. from a supervisor after Ctrl-C, must not cut it short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
