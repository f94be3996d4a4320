"""The service's processor and query engine driven in-process, without Kafka.

Used by the offline evaluation, the unit tests and the large-state benchmark: the same code
paths as the service (validity filter, de-duplication, Processor.apply, one transaction per
consumer batch, committed(), QueryEngine), with the Kafka partitioner deciding each user's
partition, so only the transport differs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from recommender_service.processor import RecommenderProcessor
from recommender_service.queries import QueryEngine
from recommender_service.settings import RecommenderSettings
from viewevents.consumer import SeenIds, is_applicable
from viewevents.kafka import KeyPartitioner, user_key
from viewevents.state import (
    I64,
    KIND_WATERMARK,
    StateStore,
    Transaction,
    offset_key,
    partition_prefix,
)
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
        self.seen = SeenIds(30)
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

    def _batch(self, records: list[ViewEvent], now_ms: int) -> None:
        """One consumer batch: per partition, as ExactlyOnceConsumer._apply does."""
        by_partition: dict[int, list[ViewEvent]] = defaultdict(list)
        for event in records:
            by_partition[self.partition_of(event.user_id)].append(event)
        txn = Transaction(self.store)
        for partition, events in sorted(by_partition.items()):
            valid = [e for e in events if is_applicable(e)]
            fresh, _ = self.seen.keep_new(partition, valid, now_ms // 86_400_000, txn)
            if fresh:
                self.processor.apply(partition, fresh, txn)
            newest = max((e.event_time.seconds for e in valid), default=0)
            if newest:
                key = partition_prefix(partition) + KIND_WATERMARK
                current = txn.get(key)
                if current is None or I64.unpack(current)[0] < newest:
                    txn.put(key, I64.pack(newest))
            self.offsets[partition] = self.offsets.get(partition, 0) + len(events)
            txn.put(offset_key(partition, self.topic), I64.pack(self.offsets[partition]))
        txn.commit()
        self.processor.committed()
