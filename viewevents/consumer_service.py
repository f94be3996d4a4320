"""Start-up and shutdown shared by the consuming services (stats, recommender).

Opens the RocksDB store, joins the consumer group, serves gRPC at once with health NOT_SERVING,
flips health to SERVING when the consumer has caught up with the end offsets seen at start, and
on SIGTERM/SIGINT stops RPCs, finishes the batch in progress and closes RocksDB.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from viewevents.config import Config
from viewevents.consumer import ExactlyOnceConsumer, Processor
from viewevents.grpc_server import (
    add_service,
    bind,
    enable_reflection_and_health,
    new_server,
    serve_until_stopped,
    set_serving,
)
from viewevents.kafka import ensure_topics
from viewevents.metrics import CONSUMER_LAG, ROCKSDB_BYTES, serve_metrics
from viewevents.state import StateStore

log = logging.getLogger(__name__)


async def run_consumer_service(
    config: Config,
    *,
    name: str,
    address: str,
    state_dir: str,
    group_id: str,
    service_descriptor: object,
    make_processor: Callable[[StateStore], Processor],
    make_servicer: Callable[[StateStore, ExactlyOnceConsumer, Processor], object],
    metrics_port: int = 0,
) -> None:
    store = StateStore(state_dir, config.rocksdb_cache_mb, config.rocksdb_write_buffer_mb)
    processor = make_processor(store)
    await ensure_topics(config, [config.view_topic, config.dead_letter_topic])
    consumer = ExactlyOnceConsumer(
        bootstrap=config.kafka_bootstrap, topic=config.view_topic, group_id=group_id,
        store=store, processor=processor, batch_max=config.consume_batch_max,
        dedupe_retention_days=config.dedupe_retention_days, client_id=f"viewevents-{name}",
        metrics_name=name)
    server = new_server(service=name)
    add_service(server, service_descriptor, make_servicer(store, consumer, processor))
    full_name = service_descriptor.full_name  # type: ignore[attr-defined]
    health = await enable_reflection_and_health(server, [full_name])
    bind(server, address, config.tls_cert_file, config.tls_key_file)
    CONSUMER_LAG.labels(name).set_function(consumer.lag)
    ROCKSDB_BYTES.labels(name).set_function(store.size_bytes)
    serve_metrics(metrics_port, name)
    await server.start()
    await consumer.start()
    consuming = asyncio.create_task(consumer.run(), name=f"{name}-consumer")
    log.info("%s service listening on %s (NOT_SERVING until caught up); state %s; group %s",
             name, address, state_dir, group_id)

    async def mark_serving() -> None:
        await consumer.caught_up.wait()
        await set_serving(health, [full_name], True)
        log.info("%s service SERVING", name)

    serving = asyncio.create_task(mark_serving())
    consuming.add_done_callback(_log_crash)

    async def stop_consumer() -> None:
        serving.cancel()
        await consumer.stop()
        try:
            await consuming
        finally:
            await consumer.close()
            store.close()

    await serve_until_stopped(server, stop_consumer)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("consumer stopped: %r", task.exception(), exc_info=task.exception())
        # Fail fast: a service that no longer consumes must not keep answering as if fresh.
        import os
        import signal
        os.kill(os.getpid(), signal.SIGTERM)
