"""Bounded staleness: which lag readings hold ingest's writes back, and the gate they drive."""

from __future__ import annotations

import asyncio

import pytest

from ingest_service.admission import AdmissionPolicy, LagAdmission
from viewevents.group_lag import GroupLag, lag_of


def test_lag_counts_a_partition_never_committed_from_the_start_of_its_log() -> None:
    ends = {0: 100, 1: 50, 2: 70}
    starts = {0: 0, 1: 20, 2: 0}
    lag = lag_of(ends, starts, {0: 60, 2: 70})
    assert lag == GroupLag(records=(100 - 60) + (50 - 20) + 0, committed=60 + 20 + 70)


def test_a_group_over_the_bound_holds_writes_back_until_it_is_within_it() -> None:
    policy = AdmissionPolicy(max_lag=1_000, stall_seconds=10)
    assert policy.holding(0.0, {"a": GroupLag(1_000, 5), "b": GroupLag(10, 9)}) == []
    assert policy.holding(0.1, {"a": GroupLag(1_001, 5), "b": GroupLag(10, 9)}) == ["a"]
    assert policy.holding(0.2, {"a": GroupLag(2_000, 6), "b": GroupLag(5_000, 10)}) == ["a", "b"]
    assert policy.holding(0.3, {"a": GroupLag(999, 7), "b": GroupLag(1_000, 11)}) == []


def test_a_group_that_stopped_moving_is_not_waited_for_until_it_moves_again() -> None:
    policy = AdmissionPolicy(max_lag=100, stall_seconds=10)
    assert policy.holding(0.0, {"gone": GroupLag(5_000, 42)}) == ["gone"]
    assert policy.holding(9.9, {"gone": GroupLag(9_000, 42)}) == ["gone"]
    assert policy.holding(10.0, {"gone": GroupLag(9_000, 42)}) == []  # stalled: ignored
    assert policy.holding(60.0, {"gone": GroupLag(20_000, 42)}) == []
    assert policy.holding(60.5, {"gone": GroupLag(19_000, 1_042)}) == ["gone"]  # back


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        AdmissionPolicy(max_lag=-1, stall_seconds=1)


class ScriptedLag:
    """A lag reader answering from a queue the test fills (one reading per poll)."""

    def __init__(self) -> None:
        self.readings: asyncio.Queue[dict[str, GroupLag] | Exception] = asyncio.Queue()
        self.closed = False

    async def read(self) -> dict[str, GroupLag]:
        reading = await self.readings.get()
        if isinstance(reading, Exception):
            raise reading
        return reading

    async def close(self) -> None:
        self.closed = True


def test_writes_wait_while_a_group_is_behind_and_go_once_it_caught_up() -> None:
    async def run() -> None:
        reader = ScriptedLag()
        gate = LagAdmission(reader, AdmissionPolicy(100, 60), poll_seconds=0)  # type: ignore[arg-type]
        polling = asyncio.create_task(gate.run())
        await gate.admit()  # nothing read yet: open

        await reader.readings.put({"g": GroupLag(500, 1)})
        await _until(lambda: gate.held_by == ["g"])
        writer = asyncio.create_task(gate.admit())
        await reader.readings.put({"g": GroupLag(300, 2)})  # still behind: still waiting
        await _until(lambda: reader.readings.empty())
        await asyncio.sleep(0)
        assert not writer.done()

        await reader.readings.put({"g": GroupLag(50, 3)})
        await asyncio.wait_for(writer, 5)
        assert gate.held_by == []

        await reader.readings.put({"g": GroupLag(900, 4)})
        await _until(lambda: gate.held_by == ["g"])
        waiting = asyncio.create_task(gate.admit())
        await reader.readings.put(ConnectionError("Kafka gone"))  # unreadable: fail open
        await asyncio.wait_for(waiting, 5)

        polling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await polling
        assert reader.closed

    asyncio.run(run())


async def _until(condition: object, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), timeout)
