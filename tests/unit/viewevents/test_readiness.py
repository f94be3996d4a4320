"""The pure rules behind health, without Kafka: catch-up per assignment, Kafka reachability,
the awaitable readiness flag, and the log filter that keeps outages readable."""

from __future__ import annotations

import asyncio
import logging

from viewevents.consumer import CatchUp
from viewevents.logs import RepeatFilter
from viewevents.readiness import Backoff, Reachability, Readiness, until_kafka_answers


def test_nothing_assigned_is_never_caught_up() -> None:
    state = CatchUp()
    assert not state.caught_up
    assert state.set_targets(state.generation, {}) is False  # no assignment: nothing to cover
    assert not state.caught_up


def test_caught_up_needs_every_owned_partition_at_its_end_offset() -> None:
    state = CatchUp()
    state.assign([0, 1], stored={0: 10})
    assert state.missing_positions() == [1]
    assert state.set_targets(state.generation, {0: 10, 1: 5})
    assert not state.caught_up  # partition 1's position is unknown
    state.positions[1] = 0
    assert not state.caught_up
    state.advance({1: 5})
    assert state.caught_up
    assert state.lag() == 0


def test_every_rebalance_starts_over_and_reports_only_owned_partitions() -> None:
    state = CatchUp()
    state.assign([0, 1, 2, 3], stored={0: 4, 1: 4, 2: 4, 3: 4})
    assert state.set_targets(state.generation, {0: 4, 1: 4, 2: 4, 3: 4})
    assert state.caught_up
    state.revoke([0, 1, 2, 3])  # eager rebalance: everything goes first
    assert not state.caught_up and state.positions == {}
    state.assign([2, 3], stored={2: 4, 3: 4})
    assert not state.caught_up  # new assignment: end offsets not read yet
    assert sorted(state.positions) == [2, 3]
    assert state.set_targets(state.generation, {2: 9, 3: 4})
    assert not state.caught_up and state.lag() == 5
    state.advance({2: 9})
    assert state.caught_up
    # Gets back partitions whose state here is old: not caught up until they are read again.
    state.revoke([2, 3])
    state.assign([0, 1, 2, 3], stored={0: 4, 1: 4, 2: 9, 3: 4})
    assert state.set_targets(state.generation, {0: 7, 1: 4, 2: 9, 3: 4})
    assert not state.caught_up
    state.advance({0: 7})
    assert state.caught_up


def _caught_up_on(partitions: list[int], group_generation: int) -> CatchUp:
    state = CatchUp()
    state.assign(partitions, {p: 10 for p in partitions}, group_generation)
    assert state.set_targets(state.generation, dict.fromkeys(partitions, 10))
    assert state.caught_up
    return state


def test_partitions_kept_through_consecutive_generations_stay_caught_up() -> None:
    """A rebalance during a large upload: the partitions this instance keeps go on answering
    (their backlog is ordinary lag), only the new one waits until it has been read."""
    state = _caught_up_on([0, 1, 2], group_generation=5)
    state.revoke([0, 1, 2], group_generation=5)  # eager: everything goes first
    assert not state.caught_up and state.caught_up_partitions() == frozenset()
    state.assign([1, 2, 3], {1: 10, 2: 10, 3: 0}, group_generation=6)
    assert state.caught_up_partitions() == {1, 2}  # before any end offset is read
    assert not state.caught_up  # partition 3 is new here
    assert state.set_targets(state.generation, {1: 900, 2: 900, 3: 900})  # the upload's backlog
    assert state.caught_up_partitions() == {1, 2} and state.lag() == 2_680
    state.advance({3: 900})
    assert state.caught_up
    # And through the next rebalance too, now that partition 3 was caught up as well.
    state.revoke([1, 2, 3], group_generation=6)
    state.assign([2, 3], {2: 10, 3: 900}, group_generation=7)
    assert state.caught_up


def test_a_break_in_membership_or_an_unknown_generation_starts_over() -> None:
    """Generations that do not follow each other (the member was dropped from the group and
    came back: others may have read its partitions meanwhile), or no generation known."""
    # Unknown (None) or reset (-1, as aiokafka does when the group dropped the member) at the
    # revocation: the generation of the revoked assignment (5) stands, so 7 is a break.
    for revoked_in, assigned_in in ((5, 8), (None, 7), (-1, 7), (5, None), (-1, 0)):
        state = _caught_up_on([0, 1], group_generation=5)
        state.revoke([0, 1], group_generation=revoked_in)
        state.assign([0, 1], {0: 10, 1: 10}, group_generation=assigned_in)
        assert state.caught_up_partitions() == frozenset(), (revoked_in, assigned_in)
        assert state.set_targets(state.generation, {0: 10, 1: 12})
        assert state.caught_up_partitions() == {0}
    # A partition still catching up when the rebalance came is not carried over.
    state = CatchUp()
    state.assign([0, 1], {0: 10, 1: 0}, group_generation=5)
    assert state.set_targets(state.generation, {0: 10, 1: 10})
    state.revoke([0, 1], group_generation=5)
    state.assign([0, 1], {0: 10, 1: 4}, group_generation=6)
    assert state.caught_up_partitions() == {0}


def test_end_offsets_read_before_a_rebalance_are_refused() -> None:
    state = CatchUp()
    state.assign([0, 1], stored={0: 3, 1: 3})
    generation = state.generation
    state.revoke([0, 1])
    state.assign([0], stored={0: 3})
    assert not state.set_targets(generation, {0: 3, 1: 3})  # read for the old assignment
    assert not state.set_targets(state.generation, {0: 3, 1: 3})  # not the owned set
    assert not state.caught_up
    assert state.set_targets(state.generation, {0: 3})
    assert state.caught_up


def test_kafka_is_down_only_after_the_grace_period_and_up_at_the_first_success() -> None:
    state = Reachability(grace=5)
    assert state.observe(False, now=100) is False and state.reachable
    assert state.observe(False, now=104.9) is False and state.reachable
    assert state.observe(False, now=105) is True and not state.reachable
    assert state.observe(False, now=200) is False and not state.reachable
    assert state.observe(True, now=201) is True and state.reachable
    assert state.observe(False, now=202) is False and state.reachable  # a new grace period


def test_readiness_wakes_waiters_on_every_change_both_ways() -> None:
    async def scenario() -> list[bool]:
        readiness = Readiness()
        seen: list[bool] = []

        async def follow() -> None:
            shown = None
            while True:
                change = readiness.next_change()
                if readiness.ready != shown:
                    shown = readiness.ready
                    seen.append(shown)
                await change.wait()

        async def until_seen(count: int) -> None:
            while len(seen) < count:
                await asyncio.sleep(0.001)

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(until_seen(1), 1)
        readiness.set(True, "caught up")
        await asyncio.wait_for(until_seen(2), 1)
        readiness.set(True, "caught up")  # no change: nothing to show
        readiness.set(False, "rebalance")
        await asyncio.wait_for(until_seen(3), 1)
        readiness.set(True, "caught up again")
        await asyncio.wait_for(until_seen(4), 1)
        follower.cancel()
        return seen

    assert asyncio.run(scenario()) == [False, True, False, True]


def _record(
    name: str, message: str, *args: object, level: int = logging.ERROR
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_repeated_kafka_errors_pass_once_then_as_a_periodic_count() -> None:
    now = [0.0]
    limit = RepeatFilter(interval=10, clock=lambda: now[0])
    passed = []
    for tick in range(150):  # 15 s of 10 errors a second
        now[0] = tick / 10
        record = _record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, "refused")
        if limit.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 2
    assert passed[0] == "Unable connect to node with id 1: refused"
    assert passed[1].startswith("Unable connect to node with id 1: refused (and 99 more")
    # Other templates, other loggers and lower levels are not held back.
    assert limit.filter(_record("aiokafka.conn", "Another failure"))
    assert limit.filter(_record("viewevents.rpc", "Unable connect to node with id %s: %s", 1, 2))
    assert limit.filter(
        _record("aiokafka.conn", "Unable connect to node with id %s: %s", 1, 2, level=logging.INFO)
    )


def test_start_up_pauses_double_up_to_the_cap() -> None:
    backoff = Backoff(first=0.5, maximum=4.0)
    assert [backoff.next_pause() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_start_up_step_is_retried_until_it_succeeds() -> None:
    attempts: list[int] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("Kafka down")
        return "up"

    result = asyncio.run(until_kafka_answers("probe", flaky, Backoff(0.001, 0.002)))
    assert result == "up" and len(attempts) == 3


def test_waiting_for_kafka_at_start_up_can_be_cancelled() -> None:
    async def never() -> None:
        raise ConnectionError("Kafka down")

    async def main() -> bool:
        waiting = asyncio.create_task(until_kafka_answers("probe", never, Backoff(10, 10)))
        await asyncio.sleep(0.01)  # now in its back-off pause
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main())
