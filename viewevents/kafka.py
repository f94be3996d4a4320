"""Kafka helpers shared by the services: record keys, partitioning, producer and topic set-up.

Record format (see docs/architecture.md): key = user_id as ASCII decimal, value = a binary
`viewevents.v1.ViewEvent` (dead-letter topic: `viewevents.v1.RejectedEvent`), and a
`content-type` header naming the message type, so any Kafka consumer can read the topics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from viewevents.config import Config

log = logging.getLogger(__name__)

VIEW_EVENT_HEADERS = [
    ("content-type", b"application/x-protobuf; messageType=viewevents.v1.ViewEvent")
]
REJECTED_EVENT_HEADERS = [
    ("content-type", b"application/x-protobuf; messageType=viewevents.v1.RejectedEvent")
]


def user_key(user_id: int) -> bytes:
    """The record key: all of a user's events go to one partition, in order."""
    return str(user_id).encode("ascii")


class KeyPartitioner:
    """Kafka's default partitioner (murmur2, as the Java client), with a bounded memo.

    Users recur constantly in a stream, so memoising the pure-Python hash pays for itself.
    """

    def __init__(self, partitions: int, memo_size: int = 200_000) -> None:
        self.partitions = partitions
        self._memo: dict[bytes, int] = {}
        self._memo_size = memo_size

    def __call__(self, key: bytes) -> int:
        partition = self._memo.get(key)
        if partition is None:
            partition = (murmur2(key) & 0x7FFFFFFF) % self.partitions
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            self._memo[key] = partition
        return partition


# A record batch (v2) has a 61-byte header; one record adds up to ~25 bytes of framing plus its
# headers (our content-type header is under 100 bytes). Keep a generous margin below the limit.
RECORD_BATCH_OVERHEAD = 512


async def probe_metadata(client: AIOKafkaClient, topics: Iterable[str]) -> None:
    """Return once a broker answered a metadata request for `topics`; raise if none did. The
    services' liveness probe of Kafka, every second: asking for the whole cluster's metadata
    instead (`fetch_all_metadata`, a consumer's `topics()`) cost 17 ms of CPU per call against
    a broker with 140 topics, growing with every topic of a shared cluster, where this costs
    nothing measurable. The client keeps `topics` among those it tracks (it uses them anyway),
    so its own periodic refresh asks for them too."""
    for topic in topics:
        client.add_topic(topic)
    if not await client.force_metadata_update():
        raise KafkaConnectionError("no broker answered a metadata request")


def producer_max_request_bytes(config: Config) -> int:
    """The producer's max_request_size (see new_producer): no batch may exceed it either."""
    return max(config.producer_batch_bytes * 2, 1 << 20)


def record_limit(max_message_bytes: int, config: Config) -> int:
    """Largest key + value of one record that a single-record batch can carry to the topic."""
    return min(max_message_bytes, producer_max_request_bytes(config)) - RECORD_BATCH_OVERHEAD


async def topics_max_message_bytes(config: Config, topics: list[str]) -> int | None:
    """The smallest `max.message.bytes` of `topics` (the broker's message.max.bytes unless a
    topic overrides it), read with DescribeConfigs; None when it cannot be read."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka_bootstrap)
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, t, {"max.message.bytes": None})
                for t in topics
            ]
        )
        limits = [
            int(entry[1])
            for response in responses
            for error_code, _, _, _, entries in response.resources
            if error_code == 0
            for entry in entries
            if entry[0] == "max.message.bytes" and entry[1]
        ]
        return min(limits) if len(limits) == len(topics) else None
    except (KafkaError, OSError, ValueError, TypeError) as error:
        log.warning("could not read max.message.bytes of %s: %r", topics, error)
        return None
    finally:
        await admin.close()


async def _warn_on_finite_retention(admin: AIOKafkaAdminClient, topic: str) -> None:
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"retention.ms": None})]
        )
        values = [
            entry[1]
            for response in responses
            for error_code, _, _, _, entries in response.resources
            if error_code == 0
            for entry in entries
            if entry[0] == "retention.ms"
        ]
    except (KafkaError, OSError, ValueError, TypeError) as error:
        log.warning("could not read retention.ms of %s: %r", topic, error)
        return
    if values and values[0] is not None and int(values[0]) >= 0:
        log.warning(
            "topic %s has retention.ms=%s: an instance that takes over a partition "
            "replays it from offset 0 and would miss deleted records; set "
            "retention.ms=-1 (docs/operations.md)",
            topic,
            values[0],
        )


def new_producer(config: Config, **overrides: object) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (acks=all)."""
    options: dict[str, object] = dict(
        bootstrap_servers=config.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=config.producer_linger_ms,
        max_batch_size=config.producer_batch_bytes,
        max_request_size=producer_max_request_bytes(config),
        request_timeout_ms=config.producer_timeout_ms,
        client_id="viewevents-ingest",
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


# A new owner of a partition rebuilds its state by replaying the partition from offset 0
# (docs/architecture.md, "Scaling out"), so the view topic must keep every record.
VIEW_TOPIC_CONFIGS = {"retention.ms": "-1", "retention.bytes": "-1"}


async def ensure_topics(config: Config, topics: list[str], partitions: int | None = None) -> None:
    """Create the topics if missing (idempotent; safe when several instances start at once).
    The view topic gets unlimited retention; an existing one with a finite retention is
    reported, since an instance that takes over a partition replays it from the beginning."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            count = partitions or config.topic_partitions
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            name=t,
                            num_partitions=count,
                            replication_factor=1,
                            topic_configs=VIEW_TOPIC_CONFIGS if t == config.view_topic else {},
                        )
                        for t in missing
                    ]
                )
                log.info("created topics %s with %d partitions", missing, count)
            except TopicAlreadyExistsError:
                pass
        for _ in range(50):  # metadata of new topics reaches the broker cache shortly after
            described = await admin.describe_topics(topics)
            if all(d.get("partitions") for d in described):
                break
            await asyncio.sleep(0.1)
        if config.view_topic in topics:
            await _warn_on_finite_retention(admin, config.view_topic)
    finally:
        await admin.close()
