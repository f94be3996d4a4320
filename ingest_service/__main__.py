"""Run the ingest service: python -m ingest_service [--flags]; see --help for every setting."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ingest_service.producers import Producers
from ingest_service.servicer import IngestServicer
from ingest_service.settings import SETTINGS
from viewevents import bootstrap
from viewevents.config import Config
from viewevents.kafka import ensure_topics, new_producer, record_limit, topics_max_message_bytes
from viewevents.v1 import ingest_service_pb2

log = logging.getLogger("ingest_service")

SERVICE = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"]


async def serve(config: Config) -> None:
    topics = [config.view_topic, config.dead_letter_topic]
    await ensure_topics(config, topics)
    max_message_bytes = await topics_max_message_bytes(config, topics)
    if max_message_bytes is None:
        max_message_bytes = config.fallback_max_message_bytes
        log.warning("assuming max.message.bytes %d (VIEWEVENTS_FALLBACK_MAX_MESSAGE_BYTES)",
                    max_message_bytes)
    max_record_bytes = record_limit(max_message_bytes, config)
    producers = Producers(lambda: new_producer(config), config.producer_timeout_ms / 1000)
    producer = await producers.start()
    partitions = {t: len(await producer.partitions_for(t)) for t in topics}
    log.info("writing to Kafka %s; topics %s; records up to %d bytes (max.message.bytes %d)",
             config.kafka_bootstrap, partitions, max_record_bytes, max_message_bytes)

    async def stop_producer() -> None:
        # flushes whatever is still queued, but do not hang if Kafka is gone
        if not await producers.stop():
            log.error("Kafka did not take the last batches within the timeout; they are lost, "
                      "and their RPCs were not acknowledged")

    endpoint = bootstrap.Endpoint(
        name="ingest", descriptor=SERVICE, address=config.ingest_address,
        metrics_port=config.ingest_metrics_port, token=config.ingest_token,
        max_request_bytes=config.max_request_bytes)
    await bootstrap.serve(config, endpoint, IngestServicer(config, producers, partitions, max_record_bytes),
                          on_stop=stop_producer)


def main(argv: Sequence[str] | None = None) -> None:
    bootstrap.main("ingest_service", __doc__, SETTINGS, serve, argv)


if __name__ == "__main__":
    main()
