"""Settings: how a service declares them, and how flags, environment and defaults resolve them.

A setting is read from its command-line flag, else its environment variable, else its default,
so the same names work in a shell, in `make run` and in docker-compose. The shared settings are
declared here; each service declares its own in its `settings` module, and the whole table is
`viewevents_tools.settings_catalogue` (also the table in docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
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


def parse_bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


METRICS_HOST = Setting(
    "metrics_host",
    "VIEWEVENTS_METRICS_HOST",
    "127.0.0.1",
    str,
    "Interface the Prometheus metrics HTTP port binds (it has no authentication): loopback by "
    "default; 0.0.0.0 to let a scraper on another host (or a published container port) in.",
)

# Settings every service reads: Kafka, TLS, logs, metrics interface.
SHARED_SETTINGS: tuple[Setting, ...] = (
    # Kafka, shared by all services.
    Setting(
        "kafka_bootstrap",
        "VIEWEVENTS_KAFKA_BOOTSTRAP",
        "127.0.0.1:9092",
        str,
        "Kafka bootstrap servers (host:port[,host:port]).",
    ),
    Setting(
        "view_topic",
        "VIEWEVENTS_VIEW_TOPIC",
        "view-events",
        str,
        "Topic of accepted view events (key: user_id as decimal text; value: ViewEvent).",
    ),
    Setting(
        "dead_letter_topic",
        "VIEWEVENTS_DEAD_LETTER_TOPIC",
        "view-events-dead-letter",
        str,
        "Topic of rejected events with their reasons (value: RejectedEvent).",
    ),
    Setting(
        "topic_partitions",
        "VIEWEVENTS_TOPIC_PARTITIONS",
        4,
        int,
        "Partitions of the topics when the ingest service creates them.",
    ),
    Setting(
        "tls_cert_file",
        "VIEWEVENTS_TLS_CERT_FILE",
        "",
        str,
        "PEM certificate chain: when set (with the key), every gRPC port serves TLS only.",
    ),
    Setting(
        "tls_key_file",
        "VIEWEVENTS_TLS_KEY_FILE",
        "",
        str,
        "PEM private key of the TLS certificate.",
    ),
    Setting("log_level", "VIEWEVENTS_LOG_LEVEL", "INFO", str, "Log level."),
    Setting("log_json", "VIEWEVENTS_LOG_JSON", False, parse_bool, "Log as JSON lines."),
    METRICS_HOST,
)

# Settings of every service that consumes the view topic into RocksDB state.
CONSUMER_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "consume_batch_max",
        "VIEWEVENTS_CONSUME_BATCH_MAX",
        20_000,
        int,
        "Most records applied in one RocksDB write batch.",
    ),
    Setting(
        "consume_batch_mb",
        "VIEWEVENTS_CONSUME_BATCH_MB",
        8,
        int,
        "About the most one RocksDB write batch writes (MiB): the next batch takes fewer records "
        "than VIEWEVENTS_CONSUME_BATCH_MAX when the last one wrote more per record (at least "
        "500). Bounds the batch in flight where writes per record grow with the state (0: off).",
    ),
    Setting(
        "consume_batch_min",
        "VIEWEVENTS_CONSUME_BATCH_MIN",
        5_000,
        int,
        "While a stream flows in (tailing an upload), a fetch of fewer records waits up to "
        "VIEWEVENTS_CONSUME_LINGER_MS for more, so per-batch costs are shared (1: never waits).",
    ),
    Setting(
        "consume_linger_ms",
        "VIEWEVENTS_CONSUME_LINGER_MS",
        30,
        int,
        "Longest wait for VIEWEVENTS_CONSUME_BATCH_MIN records (ms; 0: never waits). Idle "
        "arrivals (single events) are applied at once.",
    ),
    Setting(
        "group_commit_interval_ms",
        "VIEWEVENTS_GROUP_COMMIT_INTERVAL_MS",
        250,
        int,
        "How often (ms) a consumer commits its applied offsets to its Kafka consumer group, "
        "after RocksDB (which holds the truth): what lag tools and ingest's bounded staleness "
        "(VIEWEVENTS_INGEST_LAG_GROUPS) read. One small request each time, only when offsets moved.",
    ),
    Setting(
        "consumer_session_timeout_ms",
        "VIEWEVENTS_CONSUMER_SESSION_TIMEOUT_MS",
        10_000,
        int,
        "Kafka consumer group session timeout (ms): how long after an instance dies (kill -9, "
        "lost host) the group hands its partitions to the others. Lower: faster failover, more "
        "spurious rebalances on a stalled host. The broker bounds it "
        "(group.min.session.timeout.ms, 6,000 by default).",
    ),
    Setting(
        "consumer_heartbeat_interval_ms",
        "VIEWEVENTS_CONSUMER_HEARTBEAT_INTERVAL_MS",
        250,
        int,
        "Kafka consumer group heartbeat interval (ms), at most a third of the session timeout. "
        "A member learns from its next heartbeat that the group is rebalancing (an instance "
        "joined or died), and the others wait for it until then: a shorter interval shortens "
        "every rebalance, at one small request per interval per instance.",
    ),
    Setting(
        "dedupe_retention_days",
        "VIEWEVENTS_DEDUPE_RETENTION_DAYS",
        30,
        int,
        "How long consumers remember an event id to drop its duplicates.",
    ),
    Setting(
        "dedupe_filter_ids",
        "VIEWEVENTS_DEDUPE_FILTER_IDS",
        1_000_000,
        int,
        "Event ids per partition an in-memory filter (about 2 bytes per id, a power of two "
        "per owned partition) holds so new ids skip their RocksDB read; off for a partition "
        "whose store keeps more than half as many (0: off). All filters together stay within "
        "8 % of the memory budget; a partition beyond it goes without one.",
    ),
    Setting(
        "memory_budget_mb",
        "VIEWEVENTS_MEMORY_BUDGET_MB",
        200,
        int,
        "Memory the service is sized for (MiB): RocksDB block cache 10 %, up to 3 memtables "
        "of 6 %, Kafka fetch buffer 8 %, the service's own cache 10 % (recommender neighbour "
        "lists, own or fanned out; stats ranking rollups), a side cache 5 % (recommender hot "
        "rows), de-duplication filters 8 %; the rest is left to the process and its batch "
        "(viewevents/memory.py).",
    ),
    Setting(
        "rocksdb_cache_mb",
        "VIEWEVENTS_ROCKSDB_CACHE_MB",
        0,
        int,
        "RocksDB block cache size (MiB), overriding the budget's share (0: from the budget).",
    ),
    Setting(
        "kafka_fetch_mb",
        "VIEWEVENTS_KAFKA_FETCH_MB",
        0,
        int,
        "What the Kafka consumer's fetching may hold (MiB: a fetch response gets a quarter, a "
        "partition a sixteenth, each at least 1 MiB), overriding the budget's share (0: from "
        "the budget).",
    ),
    Setting(
        "rocksdb_write_buffer_mb",
        "VIEWEVENTS_ROCKSDB_WRITE_BUFFER_MB",
        0,
        int,
        "RocksDB memtable size (MiB; at most 3 are kept), overriding the budget's share "
        "(0: from the budget).",
    ),
    Setting(
        "malloc_arena_max",
        "VIEWEVENTS_MALLOC_ARENA_MAX",
        2,
        int,
        "Most glibc malloc arenas (mallopt M_ARENA_MAX at start-up; 0: glibc's default of 8 per "
        "core): fewer arenas keep freed memory reusable across threads (viewevents/allocator.py).",
    ),
    Setting(
        "malloc_mmap_threshold_kb",
        "VIEWEVENTS_MALLOC_MMAP_THRESHOLD_KB",
        256,
        int,
        "Allocations at least this large (KiB) get their own mapping, returned to the kernel "
        "when freed (mallopt M_MMAP_THRESHOLD; 0: glibc's dynamic threshold, up to 32 MiB). "
        "Memory against CPU: 4096 cut CPU per event by about 13 % (stats) and 5 % "
        "(recommender) for about 20 MiB more peak RSS each (docs/architecture.md, memory).",
    ),
    Setting(
        "state_dir_shared",
        "VIEWEVENTS_STATE_DIR_SHARED",
        False,
        parse_bool,
        "The state directory is shared by several instances (one docker-compose volume for all "
        "replicas): each keeps its RocksDB in its own subdirectory slot-N, the lowest N no "
        "running instance holds (a file lock), so a recreated replica takes over a store a "
        "stopped one left.",
    ),
    Setting(
        "tls_peer_ca_file",
        "VIEWEVENTS_TLS_PEER_CA_FILE",
        "",
        str,
        "PEM roots that other instances' certificates must chain to, on calls between "
        "instances (TLS on). Empty: this instance's own VIEWEVENTS_TLS_CERT_FILE.",
    ),
    Setting(
        "tls_peer_server_name",
        "VIEWEVENTS_TLS_PEER_SERVER_NAME",
        "",
        str,
        "Name other instances' certificates are checked against on calls between instances "
        "(TLS on), instead of the host of their advertised address: for replicas whose "
        "addresses are random container ids (docker-compose --scale). Empty: that host.",
    ),
)


class Config:
    """Resolved settings; attribute access by setting name (config.kafka_bootstrap)."""

    def __init__(self, settings: Sequence[Setting], values: dict[str, Any]) -> None:
        self._settings = tuple(settings)
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def settings(self) -> tuple[Setting, ...]:
        return self._settings

    def replace(self, **changes: Any) -> Config:
        unknown = set(changes) - set(self._values)
        if unknown:
            raise KeyError(f"unknown settings: {sorted(unknown)}")
        return Config(self._settings, {**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def add_flags(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """Add one flag per setting; the default shown is the environment's value if set."""
    for setting in settings:
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            type=setting.kind,
            help=f"{setting.help} Env {setting.env}; default {setting.default!r}.",
        )


def load(
    settings: Sequence[Setting],
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve `settings`: flag, else environment variable, else default."""
    env = os.environ if env is None else env
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(
            f"settings declared twice: {sorted(n for n in names if names.count(n) > 1)}"
        )
    values: dict[str, Any] = {}
    for setting in settings:
        flag_value = getattr(args, setting.name, None) if args is not None else None
        if flag_value is not None:
            values[setting.name] = flag_value
        elif setting.env in env:
            values[setting.name] = setting.kind(env[setting.env])
        else:
            values[setting.name] = setting.default
    return Config(settings, values)


def to_environment(config: Config, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that give a child process exactly `config` (on top of `base`,
    by default this process's environment)."""
    env = dict(os.environ if base is None else base)
    for setting in config.settings:
        value = getattr(config, setting.name)
        env[setting.env] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def markdown_table(settings: Sequence[Setting]) -> str:
    """The settings as a Markdown table (docs/operations.md)."""
    lines = ["| environment variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in settings:
        default = s.default if s.default != "" else "(empty)"
        lines.append(f"| `{s.env}` | `{s.flag}` | `{default}` | {s.help} |")
    return "\n".join(lines)
