"""Run the ingest service: python -m ingest_service [--flags]; see --help for every setting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from ingest_service.admission import AdmissionPolicy, LagAdmission
from ingest_service.producers import Producers
from ingest_service.servicer import IngestServicer
from ingest_service.settings import SETTINGS
from viewevents import bootstrap
from viewevents.config import Config
from viewevents.group_lag import GroupLagReader
from viewevents.kafka import (
    ensure_topics,
    new_producer,
    probe_metadata,
    record_limit,
    topics_max_message_bytes,
)
from viewevents.readiness import Readiness, until_kafka_answers, watch_kafka
from viewevents.v1 import ingest_service_pb2

log = logging.getLogger("ingest_service")

SERVICE = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"]


async def partition_counts(producer: AIOKafkaProducer, topics: list[str]) -> dict[str, int]:
    return {t: len(await producer.partitions_for(t)) for t in topics}


async def refresh_periodically(servicer: IngestServicer, seconds: float) -> None:
    """Re-read the topics' record limit every `seconds` (0: never), so that a lowered
    max.message.bytes turns into TOO_LARGE rejections without waiting for a refused batch."""
    while seconds > 0:
        await asyncio.sleep(seconds)
        try:
            await asyncio.wait_for(servicer.refresh_record_limit(), seconds)
        except Exception as error:  # noqa: BLE001 - Kafka down: keep the last known limit
            log.warning("could not re-read the topics' max.message.bytes: %r", error)


def lag_admission(config: Config) -> LagAdmission | None:
    """The bounded-staleness gate when VIEWEVENTS_INGEST_LAG_GROUPS names groups, else None."""
    groups = [g.strip() for g in config.ingest_lag_groups.split(",") if g.strip()]
    if not groups:
        return None
    log.info(
        "bounded staleness: writes wait while group(s) %s are more than %d records behind",
        ", ".join(groups),
        config.ingest_max_lag_records,
    )
    return LagAdmission(
        GroupLagReader(config.kafka_bootstrap, config.view_topic, groups),
        AdmissionPolicy(config.ingest_max_lag_records, config.ingest_lag_stall_seconds),
        config.ingest_lag_poll_ms / 1000,
    )


async def serve(config: Config) -> None:
    topics = [config.view_topic, config.dead_letter_topic]
    # Kafka may be down at start: wait for it (interruptible by SIGTERM, see bootstrap.main).
    await until_kafka_answers("creating topics", lambda: ensure_topics(config, topics))
    max_message_bytes = await topics_max_message_bytes(config, topics)
    if max_message_bytes is None:
        max_message_bytes = config.fallback_max_message_bytes
        log.warning(
            "assuming max.message.bytes %d (VIEWEVENTS_FALLBACK_MAX_MESSAGE_BYTES)",
            max_message_bytes,
        )
    max_record_bytes = record_limit(max_message_bytes, config)
    stop_bound = min(config.producer_timeout_ms / 1000, bootstrap.KAFKA_STEP_S)
    producers = Producers(lambda: new_producer(config), stop_bound)
    producer = await until_kafka_answers("starting the producer", producers.start)
    try:
        partitions = await until_kafka_answers(
            "reading partitions", lambda: partition_counts(producer, topics)
        )
    except BaseException:
        await producers.stop()
        raise
    log.info(
        "writing to Kafka %s; topics %s; records up to %d bytes (max.message.bytes %d)",
        config.kafka_bootstrap,
        partitions,
        max_record_bytes,
        max_message_bytes,
    )
    # Health follows the broker: NOT_SERVING while a metadata request has failed for a while.
    readiness = Readiness(True, "Kafka reachable")
    watching = asyncio.create_task(
        watch_kafka(
            lambda: probe_metadata(producers.current.client, topics),
            lambda up: readiness.set(up, "Kafka reachable" if up else "Kafka unreachable"),
        )
    )

    admission = lag_admission(config)
    admitting = asyncio.create_task(admission.run()) if admission is not None else None

    async def stop_producer() -> None:
        watching.cancel()
        refreshing.cancel()
        if admitting is not None:
            admitting.cancel()
        # Flush whatever is still queued, but exit promptly if Kafka is gone: by now every RPC
        # has ended, so a record still queued belongs to an RPC that was not acknowledged.
        if not await producers.stop():
            log.error(
                "Kafka did not take the last batches within %.0f s; they are lost, "
                "and their RPCs were not acknowledged",
                stop_bound,
            )

    endpoint = bootstrap.Endpoint(
        name="ingest",
        descriptor=SERVICE,
        address=config.ingest_address,
        metrics_port=config.ingest_metrics_port,
        token=config.ingest_token,
        max_request_bytes=config.max_request_bytes,
    )

    async def read_record_limit() -> int | None:
        limit = await topics_max_message_bytes(config, topics)
        return None if limit is None else record_limit(limit, config)

    servicer = IngestServicer(
        config, producers, partitions, max_record_bytes, read_record_limit, admission
    )
    refreshing = asyncio.create_task(
        refresh_periodically(servicer, config.record_limit_refresh_seconds)
    )
    await bootstrap.serve(config, endpoint, servicer, readiness=readiness, on_stop=stop_producer)


def main(argv: Sequence[str] | None = None) -> None:
    bootstrap.main("ingest_service", __doc__, SETTINGS, serve, argv)


if __name__ == "__main__":
    main()
