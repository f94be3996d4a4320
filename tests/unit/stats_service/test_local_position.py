"""The position a local answer carries is the same whether it is read from the consumer's
offsets (ExactlyOnceConsumer.positions, the fast way) or from its ConsumerPosition message."""

from __future__ import annotations

from pathlib import Path

from stats_service import request_parsing
from stats_service.reader import StatsReader
from stats_service.servicer import StatsServicer
from tests.support.positions import caught_up_position
from viewevents.state.store import StateStore
from viewevents.v1 import view_event_pb2

OFFSETS = {0: 5, 2: 9, 3: 1}


class _MessageOnly:
    """A consumer that only offers its position message (as test fakes and embedders do)."""

    def position(self) -> view_event_pb2.ConsumerPosition:
        return caught_up_position(OFFSETS)


class _WithOffsets(_MessageOnly):
    positions = dict(OFFSETS)


def test_local_position_from_offsets_equals_the_one_from_the_message(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "db"))
    try:
        reader = StatsReader(store)
        limits = request_parsing.Limits()
        fast = StatsServicer(reader, _WithOffsets(), limits)
        slow = StatsServicer(reader, _MessageOnly(), limits)
        for partitions in ([2, 0, 7], [3], [], [0, 2, 3], [1]):
            assert fast._local_position(partitions) == slow._local_position(partitions)
    finally:
        store.close()


def test_a_kept_position_is_reused_only_at_the_same_offsets_and_partitions(
    tmp_path: Path,
) -> None:
    """The last position message is kept for the offsets it was read at; any moved offset (a
    batch applied) or another set of partitions reads a fresh one, with the new watermark."""
    store = StateStore(str(tmp_path / "db"))
    try:
        consumer = _WithOffsets()
        consumer.positions = dict(OFFSETS)
        servicer = StatsServicer(StatsReader(store), consumer, request_parsing.Limits())
        first = servicer._local_position([0, 2, 3])
        assert servicer._local_position([0, 2, 3]) is first  # nothing moved: kept
        assert servicer._local_position([0, 2]).partitions[-1].partition == 2
        consumer.positions[2] = 10  # a batch of partition 2 was applied
        moved = servicer._local_position([0, 2, 3])
        assert [(p.partition, p.offset) for p in moved.partitions] == [(0, 5), (2, 10), (3, 1)]
        assert moved == StatsServicer(
            StatsReader(store), _MessageOnlyAt(consumer.positions), request_parsing.Limits()
        )._local_position([0, 2, 3])
    finally:
        store.close()


class _MessageOnlyAt:
    def __init__(self, offsets: dict[int, int]) -> None:
        self.offsets = offsets

    def position(self) -> view_event_pb2.ConsumerPosition:
        return caught_up_position(self.offsets)
