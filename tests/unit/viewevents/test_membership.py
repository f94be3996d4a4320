"""The group's assignment plan: every partition once, balanced, sticky to the state members
already hold, the same on every leader; and the owners map travels through the protocol."""

from __future__ import annotations

import itertools
import random

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from viewevents.membership import (
    Claim,
    OwnershipAssignor,
    decode_furthest,
    decode_owners,
    encode_owners,
    owners_of,
    plan_assignment,
)


def check_valid(plan: dict[str, list[int]], partitions: list[int]) -> None:
    assigned = sorted(itertools.chain.from_iterable(plan.values()))
    assert assigned == sorted(partitions)  # each exactly once
    sizes = [len(ps) for ps in plan.values()]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_every_partition_once_and_balanced_for_any_group_size() -> None:
    rng = random.Random(3)
    for members in range(1, 11):
        for count in (1, 4, 8, 13):
            claims = {
                f"m{i}": Claim(
                    f"10.0.0.{i}:50052",
                    {
                        p: rng.randrange(100)
                        for p in rng.sample(range(count), rng.randrange(count + 1))
                    },
                )
                for i in range(members)
            }
            check_valid(plan_assignment(range(count), claims), list(range(count)))


def test_more_members_than_partitions_leaves_some_idle() -> None:
    claims = {f"m{i}": Claim(f"h{i}:1") for i in range(5)}
    plan = plan_assignment(range(3), claims)
    assert sorted(len(p) for p in plan.values()) == [0, 0, 1, 1, 1]


def test_partitions_go_back_to_the_member_that_holds_their_state() -> None:
    # a and b each hold half of the state; a restarted c holds nothing.
    claims = {
        "a": Claim("a:1", {0: 900, 1: 800}),
        "b": Claim("b:1", {2: 700, 3: 600}),
        "c": Claim("c:1"),
    }
    plan = plan_assignment(range(4), claims)
    check_valid(plan, [0, 1, 2, 3])
    assert 0 in plan["a"] and 2 in plan["b"]  # the most state stays where it is
    assert len(plan["c"]) == 1 and plan["c"][0] in (1, 3)  # the newcomer takes one to replay
    alone = plan_assignment(range(4), {"b": Claim("b:1", {2: 700, 3: 600})})
    assert alone == {"b": [0, 1, 2, 3]}


def test_the_plan_does_not_depend_on_the_order_members_are_listed() -> None:
    claims = {f"m{i}": Claim(f"h{i}:1", {i % 4: 10 * i}) for i in range(3)}
    reordered = dict(reversed(list(claims.items())))
    assert plan_assignment(range(8), claims) == plan_assignment(range(8), reordered)


def test_owners_map_round_trips_and_garbage_decodes_to_nothing() -> None:
    claims = {"a": Claim("a:1"), "b": Claim("b:2")}
    owners = owners_of(plan_assignment(range(4), claims), claims)
    assert decode_owners(encode_owners(owners)) == owners
    assert set(owners.values()) == {"a:1", "b:2"}
    assert decode_owners(b"not json") == {} and Claim.decode(b"\xff").address == ""


class _Cluster:
    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self._partitions.get(topic)


def _assignor(name: str, heard: dict[str, dict[int, str]]) -> OwnershipAssignor:
    """Member `name` at address name:9 holding no state; what it hears is kept in `heard`."""

    def claim() -> Claim:
        return Claim(f"{name}:9", {})

    def on_owners(owners: dict[int, str]) -> None:
        heard[name] = owners

    return OwnershipAssignor(claim, on_owners)


def test_the_assignor_gives_every_member_the_whole_owners_map() -> None:
    heard: dict[str, dict[int, str]] = {}
    assignors = {name: _assignor(name, heard) for name in ("x", "y")}
    members = {
        name: ConsumerProtocolMemberMetadata.decode(assignors[name].metadata(["views"]).encode())
        for name in assignors
    }
    result = assignors["x"].assign(_Cluster({"views": {0, 1, 2, 3}}), members)
    for name, assignment in result.items():
        assignors[name].on_assignment(assignment)
    assert heard["x"] == heard["y"] == {0: "x:9", 1: "x:9", 2: "y:9", 3: "y:9"}
    mine = {n: sorted(tp.partition for tp in a.partitions()) for n, a in result.items()}
    assert mine == {"x": [0, 1], "y": [2, 3]}


def test_a_member_gets_only_partitions_of_the_topics_it_subscribed_to() -> None:
    """Two deployments sharing a group id by mistake, each on its own topic: aiokafka stops a
    consumer handed a partition of a topic it did not subscribe to (an e2e run crashed so)."""
    heard: dict[str, dict[int, str]] = {}
    assignors = {name: _assignor(name, heard) for name in ("x", "y", "z")}
    topic_of = {"x": "views-a", "y": "views-b", "z": "views-a"}
    members = {
        name: ConsumerProtocolMemberMetadata.decode(
            assignors[name].metadata([topic_of[name]]).encode()
        )
        for name in assignors
    }
    cluster = _Cluster({"views-a": {0, 1, 2, 3}, "views-b": {0, 1}})
    result = assignors["x"].assign(cluster, members)
    for name, assignment in result.items():
        assignors[name].on_assignment(assignment)
    got = {
        name: sorted((tp.topic, tp.partition) for tp in assignment.partitions())
        for name, assignment in result.items()
    }
    assert got == {
        "x": [("views-a", 0), ("views-a", 1)],
        "y": [("views-b", 0), ("views-b", 1)],
        "z": [("views-a", 2), ("views-a", 3)],
    }
    assert heard["x"] == heard["z"] == {0: "x:9", 1: "x:9", 2: "z:9", 3: "z:9"}
    assert heard["y"] == {0: "y:9", 1: "y:9"}


def test_every_member_hears_how_far_the_furthest_store_is_in_each_partition() -> None:
    """What a member taken back into the group checks before answering on at once: no other
    member's store is further along in the partition (viewevents.consumer.CatchUp)."""
    stores = {"x": {0: 50, 1: 7}, "y": {1: 90}}

    def assignor(name: str) -> OwnershipAssignor:
        return OwnershipAssignor(lambda: Claim(f"{name}:9", stores[name]), lambda _: None)

    assignors = {name: assignor(name) for name in stores}
    members = {
        name: ConsumerProtocolMemberMetadata.decode(assignors[name].metadata(["views"]).encode())
        for name in assignors
    }
    result = assignors["y"].assign(_Cluster({"views": {0, 1, 2}}), members)
    for name, assignment in result.items():
        assignors[name].on_assignment(assignment)
        assert assignors[name].furthest == {0: 50, 1: 90}  # no store holds partition 2
    assert decode_furthest(b"not json") == {} and decode_furthest(encode_owners({})) == {}
