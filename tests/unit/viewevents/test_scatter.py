"""Scatter-gather's pure parts: grouping by owner, the partitions header, gathering under a
deadline (complete or Incomplete naming every missing partition), merging positions."""

from __future__ import annotations

import asyncio

import pytest

from viewevents import scatter
from viewevents.consumer import CatchUp
from viewevents.membership import advertised_address
from viewevents.v1 import view_event_pb2 as ve


def test_partitions_are_grouped_by_owner_and_orphans_reported() -> None:
    owners = {0: "a:1", 1: "b:1", 2: "a:1", 3: ""}
    assert scatter.by_owner(owners, range(5)) == ({"a:1": [0, 2], "b:1": [1]}, [3, 4])


def test_the_partitions_header_round_trips_and_rejects_garbage() -> None:
    assert scatter.parse_partitions(scatter.format_partitions([3, 0, 7])) == [0, 3, 7]
    assert scatter.requested_partitions([("other", "x"), (scatter.PARTITIONS_KEY, b"1,2")]) == [
        1,
        2,
    ]
    assert scatter.requested_partitions([("other", "x")]) is None
    for bad in ("", "a", "-1", ","):
        with pytest.raises(ValueError):
            scatter.parse_partitions(bad)


def run(coroutine):  # noqa: ANN001, ANN201
    return asyncio.run(coroutine)


def test_gather_asks_each_owner_once_for_its_partitions() -> None:
    asked: list[tuple[str, list[int]]] = []

    async def ask(address: str, partitions: list[int]) -> int:
        asked.append((address, partitions))
        return len(partitions)

    partials = run(scatter.gather({0: "a", 1: "b", 2: "a"}, ask))
    assert sorted(asked) == [("a", [0, 2]), ("b", [1])]
    assert {(p.address, p.partitions, p.result) for p in partials} == {
        ("a", (0, 2), 2),
        ("b", (1,), 1),
    }


def test_gather_is_complete_or_names_every_missing_partition() -> None:
    async def ask(address: str, partitions: list[int]) -> int:
        if address == "down":
            raise scatter.OwnerUnavailable("not caught up")
        if address == "slow":
            await asyncio.sleep(10)
        return 1

    with pytest.raises(scatter.Incomplete) as error:
        run(scatter.gather({0: "up", 1: "down", 2: "slow", 3: "down"}, ask, timeout=0.2))
    assert error.value.missing.keys() == {1, 2, 3}
    assert "1,3" in str(error.value) and "within" in error.value.missing[2]
    with pytest.raises(scatter.Incomplete) as orphan:
        run(scatter.gather({0: "up"}, ask, partitions=[0, 1]))
    assert orphan.value.missing == {1: "no known owner"}
    with pytest.raises(scatter.Incomplete):
        run(scatter.gather({}, ask))  # nothing assigned yet: no answer, not an empty one


def test_positions_merge_into_one_covering_every_partial() -> None:
    one = ve.ConsumerPosition(
        partitions=[ve.PartitionOffset(partition=2, offset=5)], caught_up=True
    )
    one.event_time_watermark.seconds = 100
    two = ve.ConsumerPosition(
        partitions=[ve.PartitionOffset(partition=0, offset=9)], caught_up=True
    )
    merged = scatter.merge_positions([one, two])
    assert [(p.partition, p.offset) for p in merged.partitions] == [(0, 9), (2, 5)]
    assert merged.caught_up and merged.event_time_watermark.seconds == 100
    two.caught_up = False
    assert not scatter.merge_positions([one, two]).caught_up


def test_a_partition_read_by_several_partials_is_at_the_lowest_offset_read() -> None:
    """A recommendation gathers neighbour lists computed at different positions: the answer
    holds at least what the oldest says, whatever the order of the lists."""
    older = ve.ConsumerPosition(
        partitions=[
            ve.PartitionOffset(partition=0, offset=4),
            ve.PartitionOffset(partition=1, offset=7),
        ]
    )
    newer = ve.ConsumerPosition(
        partitions=[
            ve.PartitionOffset(partition=0, offset=9),
            ve.PartitionOffset(partition=1, offset=6),
        ]
    )
    for order in ([older, newer], [newer, older]):
        merged = scatter.merge_positions(order)
        assert [(p.partition, p.offset) for p in merged.partitions] == [(0, 4), (1, 6)]


def test_only_caught_up_owned_partitions_are_answerable() -> None:
    state = CatchUp()
    state.assign([0, 1], {0: 10, 1: 3})
    assert state.caught_up_partitions() == frozenset()  # end offsets not read yet
    assert state.set_targets(state.generation, {0: 10, 1: 8})
    assert state.caught_up_partitions() == {0}
    state.advance({1: 8})
    assert state.caught_up_partitions() == {0, 1}
    state.assign([1, 2], {})
    assert state.caught_up_partitions() == frozenset()  # a new assignment starts over


def test_the_advertised_address_is_dialable() -> None:
    assert advertised_address("10.1.2.3:50052") == "10.1.2.3:50052"
    assert advertised_address("0.0.0.0:50052", hostname="stats-2") == "stats-2:50052"
    assert advertised_address("[::]:50052", hostname="stats-2") == "stats-2:50052"
    assert advertised_address("0.0.0.0:50052", "lb.example:443") == "lb.example:443"
