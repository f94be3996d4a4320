"""Run the ingest service: python -m ingest_service [--flags]; see --help for every setting."""

from __future__ import annotations

import asyncio
import logging

from ingest_service.server import IngestService
from viewevents import config as settings
from viewevents.grpc_server import (
    add_service,
    bind,
    enable_reflection_and_health,
    new_server,
    serve_until_stopped,
    set_serving,
)
from viewevents.kafka import ensure_topics, new_producer
from viewevents.metrics import serve_metrics
from viewevents.v1 import ingest_service_pb2

log = logging.getLogger("ingest_service")

SERVICE = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"]


async def serve(config: settings.Config) -> None:
    topics = [config.view_topic, config.dead_letter_topic]
    await ensure_topics(config, topics)
    producer = new_producer(config)
    await producer.start()
    partitions = {t: len(await producer.partitions_for(t)) for t in topics}
    server = new_server(config.max_request_bytes, service="ingest", token=config.ingest_token,
                        protected_services=[SERVICE.full_name])
    add_service(server, SERVICE, IngestService(config, producer, partitions))
    health = await enable_reflection_and_health(server, [SERVICE.full_name])
    bind(server, config.ingest_address, config.tls_cert_file, config.tls_key_file)
    serve_metrics(config.ingest_metrics_port, "ingest")
    await server.start()
    await set_serving(health, [SERVICE.full_name], True)
    log.info("ingest service listening on %s; Kafka %s; topics %s", config.ingest_address,
             config.kafka_bootstrap, partitions)

    async def stop_producer() -> None:
        try:  # flushes whatever is still queued, but do not hang if Kafka is gone
            await asyncio.wait_for(producer.stop(), config.producer_timeout_ms / 1000)
        except TimeoutError:
            log.error("Kafka did not take the last batches within the timeout; they are lost, "
                      "and their RPCs were not acknowledged")

    await serve_until_stopped(server, stop_producer)


def main(argv: list[str] | None = None) -> None:
    settings.run_service("ingest_service", "ingest", __doc__, serve, argv)


if __name__ == "__main__":
    main()
