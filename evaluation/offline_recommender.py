"""The service's processor and query engine driven in-process, without Kafka.

Used by the offline evaluation, the unit tests and the large-state benchmark: the same code
paths as the service (validity filter, de-duplication, Processor.apply, one transaction per
consumer batch, committed(), QueryEngine), with the Kafka partitioner deciding each user's
partition, so only the transport differs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from aiokafka.structs import ConsumerRecord, TopicPartition

from recommender_service.processor import RecommenderProcessor
from recommender_service.query_engine import QueryEngine
from recommender_service.settings import RecommenderSettings
from viewevents.consumer import ExactlyOnceConsumer
from viewevents.kafka import KeyPartitioner, user_key
from viewevents.state.store import StateStore
from viewevents.v1 import view_event_pb2

ViewEvent = view_event_pb2.ViewEvent


class OfflineRecommender:
    """A recommender over a local RocksDB directory, fed with `feed()` instead of a topic."""

    def __init__(
        self,
        path: str,
        settings: RecommenderSettings,
        partitions: int = 4,
        batch_max: int = 20_000,
        topic: str = "offline",
        cache_mb: int = 128,
        write_buffer_mb: int = 32,
    ) -> None:
        self.store = StateStore(path, cache_mb, write_buffer_mb)
        self.topic = topic
        self.partitions = partitions
        self.batch_max = batch_max
        self.partitioner = KeyPartitioner(partitions)
        self.processor = RecommenderProcessor(self.store, topic, settings)
        self.engine = QueryEngine(lambda: self.processor.view, settings)
        # The service's own consume step, fed records built here instead of fetched from Kafka.
        self.consumer = ExactlyOnceConsumer(
            bootstrap="in-process",
            topic=topic,
            group_id="in-process",
            store=self.store,
            processor=self.processor,
            batch_max=batch_max,
            metrics_name="offline",
        )
        self.offsets: dict[int, int] = self.store.stored_offsets(topic, range(partitions))

    def close(self) -> None:
        self.engine.stop_warmer()
        self.engine.clear()
        self.processor.release()
        self.store.close()

    def partition_of(self, user: int) -> int:
        return self.partitioner(user_key(user))

    def feed(self, events: Iterable[ViewEvent], now_ms: int = 1_700_000_000_000) -> int:
        """Apply events in consumer batches of `batch_max` records; returns records fed."""
        pending: list[ViewEvent] = []
        fed = 0
        for event in events:
            pending.append(event)
            if len(pending) >= self.batch_max:
                self._batch(pending, now_ms)
                fed += len(pending)
                pending = []
        if pending:
            self._batch(pending, now_ms)
            fed += len(pending)
        return fed

    def _batch(self, events: list[ViewEvent], now_ms: int) -> None:
        """One consumer batch, through ExactlyOnceConsumer.apply_batch like the service's."""
        by_partition: dict[int, list[ConsumerRecord]] = defaultdict(list)
        for event in events:
            key = user_key(event.user_id)
            partition = self.partitioner(key)
            offset = self.offsets.get(partition, 0)
            self.offsets[partition] = offset + 1
            by_partition[partition].append(
                ConsumerRecord(
                    self.topic,
                    partition,
                    offset,
                    now_ms,
                    0,
                    key,
                    event.SerializeToString(),
                    None,
                    len(key),
                    0,
                    [],
                )
            )
        self.consumer.apply_batch(
            {TopicPartition(self.topic, p): records for p, records in sorted(by_partition.items())}
        )
