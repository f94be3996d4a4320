"""Prometheus metrics of the three services, defined once (served per process over HTTP)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from viewevents.config import METRICS_HOST

log = logging.getLogger(__name__)

RPC_SECONDS = Histogram(
    "viewevents_rpc_duration_seconds",
    "gRPC handler time, by method and status code.",
    ["service", "method", "code"],
    buckets=(
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.02,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        300,
    ),
)
EVENTS_RECEIVED = Counter(
    "viewevents_events_received_total", "Events received by the ingest service."
)
EVENTS_ACCEPTED = Counter(
    "viewevents_events_accepted_total", "Events valid and acknowledged by Kafka."
)
EVENTS_REJECTED = Counter(
    "viewevents_events_rejected_total",
    "Events rejected, by violation reason (an event with several violations counts under each).",
    ["field", "reason"],
)
RECORDS_PRODUCED = Counter(
    "viewevents_records_produced_total", "Records acknowledged by Kafka.", ["topic"]
)
EVENTS_CONSUMED = Counter(
    "viewevents_events_consumed_total", "Records read from Kafka by a consumer.", ["service"]
)
EVENTS_APPLIED = Counter(
    "viewevents_events_applied_total", "New valid events applied to state.", ["service"]
)
DUPLICATES = Counter(
    "viewevents_duplicate_events_total", "Events dropped as duplicate ids.", ["service"]
)
WRITE_STALL_SECONDS = Counter(
    "viewevents_rocksdb_write_stall_seconds_total",
    "Time commits waited for RocksDB compaction to let a write through (write stalls).",
    ["service"],
)
CONSUMER_LAG = Gauge(
    "viewevents_consumer_lag_records",
    "Records behind the end offsets seen at assignment.",
    ["service"],
)
PARTITION_OWNER = Gauge(
    "viewevents_partition_owner",
    "1 per partition for the query address of "
    "its owner, as this instance last heard from the consumer group.",
    ["service", "partition", "address"],
)
FANOUT_CALLS = Counter(
    "viewevents_fanout_calls_total",
    "Calls this instance made to a partition "
    "owner (itself included) to answer a query, by owner and outcome.",
    ["service", "owner", "outcome"],
)
ADMISSION_WAIT_SECONDS = Counter(
    "viewevents_ingest_admission_wait_seconds_total",
    "Time ingest RPCs waited before writing because a watched consumer group was too far "
    "behind (VIEWEVENTS_INGEST_LAG_GROUPS), summed over RPCs.",
)
ADMISSION_HELD = Gauge(
    "viewevents_ingest_admission_held",
    "1 while ingest holds writes back for a watched consumer group, else 0.",
)
WATCHED_GROUP_LAG = Gauge(
    "viewevents_ingest_watched_group_lag_records",
    "Records a watched consumer group's committed offsets are behind the view topic's end, as "
    "ingest last read them.",
    ["group"],
)
ROCKSDB_BYTES = Gauge(
    "viewevents_rocksdb_size_bytes", "RocksDB SST plus memtable bytes.", ["service"]
)


class _CacheCounts:
    """Counters an in-memory cache keeps as plain integers on its hot path (no lock or label
    look-up per entry), read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources: dict[tuple[str, str], Callable[[], Mapping[str, int]]] = {}

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "viewevents_cache_lookups",
            "Entries a service's in-memory cache served, by outcome (the ListTopMedia rollups: "
            "hit, refresh from the changed keys, load in full, build from other entries).",
            labels=["service", "cache", "outcome"],
        )
        size = GaugeMetricFamily(
            "viewevents_cache_bytes",
            "Bytes a service's in-memory cache holds.",
            labels=["service", "cache"],
        )
        for (service, cache), read in list(self.sources.items()):
            for outcome, value in read().items():
                if outcome == "bytes":
                    size.add_metric([service, cache], value)
                else:
                    lookups.add_metric([service, cache, outcome], value)
        yield lookups
        yield size


_CACHE_COUNTS = _CacheCounts()
REGISTRY.register(_CACHE_COUNTS)


def watch_cache(service: str, cache: str, read: Callable[[], Mapping[str, int]]) -> None:
    """Expose a cache's counters (`read()`: outcome -> count, and "bytes" -> its size) under
    `service` and `cache`, in place of an earlier cache of the same names."""
    _CACHE_COUNTS.sources[(service, cache)] = read


def serve_metrics(port: int, service: str, host: str | None = None) -> None:
    """Expose /metrics on `host`:`port` (0: off). The endpoint has no authentication, so it
    listens on loopback unless the operator opens it: `host` None means the `metrics_host`
    setting as the environment gives it (VIEWEVENTS_METRICS_HOST, default 127.0.0.1)."""
    if not port:
        return
    if host is None:
        host = os.environ.get(METRICS_HOST.env, METRICS_HOST.default) or METRICS_HOST.default
    start_http_server(port, addr=host)
    log.info("%s metrics on http://%s:%d/metrics", service, host, port)
