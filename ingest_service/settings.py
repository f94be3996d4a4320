"""The ingest service's own settings (the shared ones are in viewevents.config)."""

from __future__ import annotations

from viewevents.config import SHARED_SETTINGS, Setting

OWN_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "ingest_address",
        "VIEWEVENTS_INGEST_ADDRESS",
        "127.0.0.1:50051",
        str,
        "Address the ingest service listens on.",
    ),
    Setting(
        "max_request_bytes",
        "VIEWEVENTS_MAX_REQUEST_BYTES",
        8 * 1024 * 1024,
        int,
        "Largest gRPC request accepted (bigger ones get RESOURCE_EXHAUSTED).",
    ),
    Setting(
        "max_events_per_request",
        "VIEWEVENTS_MAX_EVENTS_PER_REQUEST",
        10_000,
        int,
        "Most events in one request (more gets RESOURCE_EXHAUSTED).",
    ),
    Setting(
        "max_future_skew_seconds",
        "VIEWEVENTS_MAX_FUTURE_SKEW_SECONDS",
        300,
        int,
        "Event times further than this in the future are rejected.",
    ),
    Setting(
        "max_event_age_days",
        "VIEWEVENTS_MAX_EVENT_AGE_DAYS",
        3650,
        int,
        "Event times older than this are rejected.",
    ),
    Setting(
        "max_event_id_bytes",
        "VIEWEVENTS_MAX_EVENT_ID_BYTES",
        256,
        int,
        "Longest event_id accepted, in UTF-8 bytes (longer: rejected, TOO_LONG).",
    ),
    Setting(
        "fallback_max_message_bytes",
        "VIEWEVENTS_FALLBACK_MAX_MESSAGE_BYTES",
        1_000_000,
        int,
        "Kafka record-batch limit assumed when the topics' max.message.bytes cannot be read "
        "at start-up (events that would not fit are rejected, TOO_LARGE).",
    ),
    Setting(
        "upload_idle_timeout_seconds",
        "VIEWEVENTS_UPLOAD_IDLE_TIMEOUT_SECONDS",
        60.0,
        float,
        "An Upload/UploadStream that sends no request for this long ends DEADLINE_EXCEEDED.",
    ),
    Setting(
        "max_rejections_reported",
        "VIEWEVENTS_MAX_REJECTIONS_REPORTED",
        100,
        int,
        "How many rejections an UploadSummary lists (all are counted and dead-lettered).",
    ),
    Setting(
        "max_inflight_batches",
        "VIEWEVENTS_MAX_INFLIGHT_BATCHES",
        64,
        int,
        "Kafka batches an upload may have unacknowledged before it stops reading the stream.",
    ),
    Setting(
        "producer_linger_ms",
        "VIEWEVENTS_PRODUCER_LINGER_MS",
        5,
        int,
        "Producer linger (ms) before a partly filled batch is sent.",
    ),
    Setting(
        "producer_batch_bytes",
        "VIEWEVENTS_PRODUCER_BATCH_BYTES",
        512 * 1024,
        int,
        "Producer batch size in bytes.",
    ),
    Setting(
        "producer_timeout_ms",
        "VIEWEVENTS_PRODUCER_TIMEOUT_MS",
        30_000,
        int,
        "How long Kafka may take to acknowledge a batch before the RPC fails UNAVAILABLE.",
    ),
    Setting(
        "record_limit_refresh_seconds",
        "VIEWEVENTS_RECORD_LIMIT_REFRESH_SECONDS",
        60.0,
        float,
        "How often the topics' max.message.bytes is re-read (also at once after Kafka refused a "
        "batch as too large), so a lowered limit rejects events TOO_LARGE (0: only at start).",
    ),
    Setting(
        "ingest_lag_groups",
        "VIEWEVENTS_INGEST_LAG_GROUPS",
        "",
        str,
        "Bounded staleness (off when empty): comma-separated consumer groups (e.g. "
        "viewevents-stats,viewevents-recommender) that ingest waits for before writing while "
        "one is more than VIEWEVENTS_INGEST_MAX_LAG_RECORDS behind the view topic, so uploads "
        "run at the consumers' pace and answers stay fresh (ingest/admission.py).",
    ),
    Setting(
        "ingest_max_lag_records",
        "VIEWEVENTS_INGEST_MAX_LAG_RECORDS",
        30_000,
        int,
        "Records (over all partitions) a watched group may be behind before ingest holds writes "
        "back; freshness is about this over the group's consume rate.",
    ),
    Setting(
        "ingest_lag_poll_ms",
        "VIEWEVENTS_INGEST_LAG_POLL_MS",
        50,
        int,
        "How often ingest reads the watched groups' lag (ms): one ListOffsets and one "
        "OffsetFetch per group each time.",
    ),
    Setting(
        "ingest_lag_stall_seconds",
        "VIEWEVENTS_INGEST_LAG_STALL_SECONDS",
        10.0,
        float,
        "A watched group whose committed offsets did not move for this long (no member "
        "running, or stuck) is not waited for until it moves again.",
    ),
    Setting(
        "ingest_metrics_port",
        "VIEWEVENTS_INGEST_METRICS_PORT",
        9101,
        int,
        "Prometheus metrics HTTP port of the ingest service (0: off).",
    ),
    Setting(
        "ingest_token",
        "VIEWEVENTS_INGEST_TOKEN",
        "",
        str,
        "When set, IngestService calls need 'authorization: Bearer <token>' metadata.",
    ),
)

SETTINGS = SHARED_SETTINGS + OWN_SETTINGS
