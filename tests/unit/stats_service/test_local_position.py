"""The position a local answer carries is the same whether it is read from the consumer's
offsets (ExactlyOnceConsumer.positions, the fast way) or from its ConsumerPosition message."""

from __future__ import annotations

from pathlib import Path

from stats_service import request_parsing
from stats_service.reader import StatsReader
from stats_service.servicer import StatsServicer
from viewevents.state.store import StateStore
from viewevents.v1 import view_event_pb2

OFFSETS = {0: 5, 2: 9, 3: 1}


class _MessageOnly:
    """A consumer that only offers its position message (as test fakes and embedders do)."""

    def position(self) -> view_event_pb2.ConsumerPosition:
        return view_event_pb2.ConsumerPosition(
            partitions=[
                view_event_pb2.PartitionOffset(partition=p, offset=o)
                for p, o in sorted(OFFSETS.items())
            ],
            caught_up=True,
        )


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
