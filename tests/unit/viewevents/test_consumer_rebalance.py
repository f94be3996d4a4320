"""The consume loop across a rebalance, with an in-process Kafka: records aiokafka drained from
Kafka's group offset before the rebalance listener seeked to the store's offset are never
applied, so a partition's stored offset never runs ahead of the records its state holds.

The interleaving is the one seen in the recommender's kill-and-replace test: a partition moves
to an instance whose store is behind the group offset the previous owner committed (it holds
nothing for it, or what an earlier assignment left); aiokafka starts the new assignment at that
group offset, hands out records from there, and only then does the listener seek to the store's
offset. Applying those records stored an offset past records never applied, and until the
re-read filled the gap every answer claimed it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp

from viewevents.consumer import CatchUp, ExactlyOnceConsumer, _SeekToStoredOffsets
from viewevents.kafka_fetch import FetchedRecords
from viewevents.state.store import StateStore
from viewevents.state.transaction import Transaction
from viewevents.v1 import view_event_pb2 as ve

TOPIC = "t"
DAY = 20_000  # days since 1970: inside any de-duplication retention of the test


def event_value(partition: int, offset: int) -> bytes:
    return ve.ViewEvent(
        event_id=f"{partition}-{offset}",
        media_id=1,
        user_id=2,
        event_type=ve.EVENT_TYPE_WAYPOINT,
        event_time=Timestamp(seconds=DAY * 86_400),
    ).SerializeToString()


class FakeKafka:
    """What the loop and the listener call on an AIOKafkaConsumer, over an in-memory log:
    positions move when records are drained (as aiokafka's do) and when seeked."""

    def __init__(self, log: dict[int, int]) -> None:
        self.log = log  # partition -> records in it (offsets 0 .. n - 1)
        self.position_of: dict[int, int] = {}
        self.group: dict[int, int] = {}  # the group's committed offsets (any member's commits)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position_of[tp.partition] = offset

    async def seek_to_beginning(self, *tps: TopicPartition) -> bool:
        for tp in tps:
            self.position_of[tp.partition] = 0
        await asyncio.sleep(0)  # aiokafka waits for the reset to complete
        return True

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.log[tp.partition] for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.position_of[tp.partition]

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.group.update((tp.partition, offset) for tp, offset in offsets.items())

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.group.get(tp.partition)

    def drain(self, partitions: Sequence[int]) -> dict[TopicPartition, FetchedRecords]:
        """Every record after the positions of `partitions`; the positions move past them."""
        out = {}
        for partition in partitions:
            start, end = self.position_of[partition], self.log[partition]
            if start >= end:
                continue
            out[TopicPartition(TOPIC, partition)] = self.records(partition, start, end)
            self.position_of[partition] = end
        return out

    @staticmethod
    def records(partition: int, start: int, end: int) -> FetchedRecords:
        offsets = list(range(start, end))
        values: list[bytes | None] = [event_value(partition, o) for o in offsets]
        return FetchedRecords(offsets, values, DAY * 86_400_000, end)


class Checked:
    """A processor that, at every commit, compares what it was given with brute force: the
    events of each partition must be exactly the records below the stored offset."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.applied: dict[int, set[str]] = {}
        self.violations: list[tuple[int, int, int]] = []  # (partition, stored offset, events)

    def apply(self, partition: int, events: list[ve.ViewEvent], txn: Transaction) -> None:
        self.applied.setdefault(partition, set()).update(e.event_id for e in events)

    def committed(self) -> None:
        for partition, offset in self.store.stored_offsets(TOPIC, sorted(self.applied)).items():
            expected = {f"{partition}-{o}" for o in range(offset)}
            if self.applied[partition] != expected:
                self.violations.append((partition, offset, len(self.applied[partition])))


class TakeOver:
    """`getmany` scripted as the group gives this instance partition 1, which the previous
    owner committed up to `group_offset` in Kafka, so aiokafka starts the new assignment there.
    As in the service: the loop holds the apply lock (applying an earlier batch) when the
    rebalance listener is called, so the listener waits for it; the loop releases it and, before
    the listener has run, its next `getmany` drains records from the group offset. The listener
    then seeks to the store's offset and assigns before the loop gets the lock back. Afterwards,
    plain fetches."""

    def __init__(self, consumer: ExactlyOnceConsumer, kafka: FakeKafka, group_offset: int) -> None:
        self.consumer = consumer
        self.kafka = kafka
        self.group_offset = group_offset
        self.listener = _SeekToStoredOffsets(consumer)
        self.step = 0
        self.listening: asyncio.Task[None] | None = None

    async def getmany(self, timeout_ms: int, max_records: int) -> dict:
        self.step += 1
        if self.step == 1:
            lock = self.consumer._apply_lock
            await lock.acquire()  # the loop, applying an earlier batch
            self.kafka.position_of[1] = self.group_offset  # aiokafka: from the group offset
            assigned = [TopicPartition(TOPIC, 1)]
            self.listening = asyncio.create_task(self.listener.on_partitions_assigned(assigned))
            await asyncio.sleep(0)  # the listener is called and waits for the lock
            lock.release()  # the batch is committed; the listener is next in line
            drained = self.kafka.drain([1])  # nothing yields from here until the loop has it
            assert not self.listening.done()
            return drained
        drained = self.kafka.drain(sorted(self.consumer.catch_up.assigned))
        if not drained:
            if self.consumer.catch_up.caught_up:
                self.consumer._stop.set()
            await asyncio.sleep(0.01)  # getmany's wait for records
        return drained


@pytest.mark.parametrize(
    "stored",
    [
        0,  # a partition this instance never had: the listener seeks to the beginning
        3,  # one it had earlier (another member went further since): to its stored offset
    ],
)
def test_records_drained_before_the_listener_seeked_are_not_applied(
    tmp_path: Path, stored: int
) -> None:
    store = StateStore(str(tmp_path / "db"))
    processor = Checked(store)
    consumer = ExactlyOnceConsumer(
        bootstrap="127.0.0.1:1", topic=TOPIC, group_id="g", store=store, processor=processor
    )
    kafka = FakeKafka({1: 10})
    if stored:  # the state an earlier assignment left: records below `stored` applied
        consumer.apply_fetched({TopicPartition(TOPIC, 1): kafka.records(1, 0, stored)})
    script = TakeOver(consumer, kafka, group_offset=6)
    consumer._consumer = kafka  # the calls the loop makes
    consumer._fetch = script  # type: ignore[assignment]

    async def run() -> None:
        await asyncio.wait_for(consumer.run(), 30)
        assert script.listening is not None and script.listening.done()
        await script.listening

    try:
        asyncio.run(run())
        assert not processor.violations, (
            "stored offsets ran ahead of the records applied (partition, offset, events): "
            f"{processor.violations}"
        )
        assert processor.applied[1] == {f"1-{o}" for o in range(10)}
        assert consumer.positions == {1: 10}
        assert store.stored_offsets(TOPIC, [1]) == {1: 10}
    finally:
        store.close()


class _Coordinator:
    generation = 0


def test_the_listener_keeps_partitions_owned_through_consecutive_generations(
    tmp_path: Path,
) -> None:
    """The rebalance listener passes aiokafka's group generation to the bookkeeping: kept
    partitions stay caught up, a partition new to this instance waits for its backlog. After a
    break in the generations (the group dropped this instance and took it back), a partition it
    was caught up on stays caught up only while the group's committed offset is not past the
    store's: no other member moved it on meanwhile."""
    store = StateStore(str(tmp_path / "db"))
    consumer = ExactlyOnceConsumer(
        bootstrap="127.0.0.1:1", topic=TOPIC, group_id="g", store=store, processor=Checked(store)
    )
    kafka = FakeKafka({0: 10, 1: 10, 2: 10})
    kafka._coordinator = _Coordinator()  # type: ignore[attr-defined]
    consumer._consumer = kafka
    listener = _SeekToStoredOffsets(consumer)
    tps = [TopicPartition(TOPIC, p) for p in range(3)]

    async def rebalance(
        generation: int, revoked: list[int], assigned: list[int], dropped: bool = False
    ) -> None:
        if dropped:  # aiokafka resets its generation before revoking when the group dropped it
            kafka._coordinator.generation = -1  # type: ignore[attr-defined]
        await listener.on_partitions_revoked([tps[p] for p in revoked])
        if dropped:
            kafka.group[1] = moved_on  # what other members committed meanwhile
        kafka._coordinator.generation = generation  # type: ignore[attr-defined]
        await listener.on_partitions_assigned([tps[p] for p in assigned])
        await consumer._check_caught_up_once()

    moved_on = 10

    async def scenario() -> list[frozenset[int]]:
        seen = []
        kafka._coordinator.generation = 3  # type: ignore[attr-defined]
        await listener.on_partitions_assigned(tps[:2])
        consumer.apply_fetched({tps[p]: kafka.records(p, 0, 10) for p in (0, 1)})
        await consumer._commit_group_offsets()
        await consumer._check_caught_up_once()
        seen.append(consumer.catch_up.caught_up_partitions())
        kafka.log = {0: 500, 1: 500, 2: 500}  # an upload's backlog arrives
        await rebalance(4, revoked=[0, 1], assigned=[1, 2])  # consecutive: 1 is kept
        seen.append(consumer.catch_up.caught_up_partitions())
        await rebalance(9, [1, 2], [1, 2], dropped=True)  # taken back, nobody moved 1 on
        seen.append(consumer.catch_up.caught_up_partitions())
        nonlocal moved_on
        moved_on = 300  # another member applied partition 1 up to 300 and committed
        await rebalance(15, [1, 2], [1, 2], dropped=True)  # a break: start over
        seen.append(consumer.catch_up.caught_up_partitions())
        return seen

    try:
        assert asyncio.run(scenario()) == [
            frozenset({0, 1}),
            frozenset({1}),
            frozenset({1}),
            frozenset(),
        ]
        assert not consumer.readiness.ready
    finally:
        store.close()


def test_a_partition_taken_back_is_kept_only_when_the_group_offsets_say_so() -> None:
    catch_up = CatchUp()
    catch_up.assign([0, 1, 2], {0: 10, 1: 10, 2: 10}, group_generation=3)
    assert catch_up.set_targets(catch_up.generation, {0: 10, 1: 10, 2: 10})
    assert catch_up.caught_up_partitions() == {0, 1, 2}
    for committed, furthest, kept in [
        ({}, {}, set()),  # Kafka did not tell in time: the strict path
        (None, {}, set()),
        ({0: None, 1: 10, 2: 11}, {}, {1}),  # 0 never committed; 2 moved on by a member that left
        ({0: 9, 1: 10, 2: 10}, {0: 10, 1: 12, 2: 3}, {0, 2}),  # a joining member's store is at 12
    ]:
        # aiokafka resets its generation (-1) before revoking when the group dropped it.
        catch_up.revoke([0, 1, 2], group_generation=-1)
        assert catch_up.taken_back([0, 1, 2, 3], group_generation=5) == [0, 1, 2]
        assert catch_up.taken_back([0, 1], group_generation=4) == []  # consecutive: no need
        catch_up.assign([0, 1, 2, 3], {0: 10, 1: 10, 2: 10}, 5, committed, furthest)
        assert catch_up.caught_up_partitions() == kept
        catch_up.assign([0, 1, 2], {0: 10, 1: 10, 2: 10}, 3)  # caught up again for the next
        assert catch_up.set_targets(catch_up.generation, {0: 10, 1: 10, 2: 10})
