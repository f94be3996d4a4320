"""Which instance owns which partition, at which address: carried by Kafka's group protocol.

Every member of a consumer group sends, when it joins, a small claim in its member metadata:
the address at which it answers queries, and the offsets its own RocksDB already holds for each
partition. The group leader's assignor (this module, run inside the Kafka client) plans the
assignment and writes the complete partition -> address map into every member's assignment, so
after each rebalance every instance knows every owner: no extra coordination service, the way
Kafka Streams spreads `application.server`.

The plan is balanced (every member gets the floor or the ceiling of partitions / members) and
state-aware: a partition goes first to the member whose store is furthest along in it (least to
replay), so a restarted instance gets its own partitions back and a new one takes partitions
with the least state to rebuild.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

log = logging.getLogger(__name__)

ASSIGNOR_NAME = "viewevents-owners"
ASSIGNOR_VERSION = 1
V = TypeVar("V")


@dataclass(frozen=True)
class Claim:
    """What a member tells the leader when it joins."""

    address: str
    stored_offsets: Mapping[int, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(
            {"address": self.address, "stored": {str(p): o for p, o in self.stored_offsets.items()}}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Claim:
        try:
            value = json.loads(data or b"{}")
            return cls(
                str(value.get("address", "")),
                {int(p): int(o) for p, o in value.get("stored", {}).items()},
            )
        except (ValueError, TypeError, AttributeError):
            return cls("")  # a member of another version: owns partitions, address unknown


def plan_assignment(partitions: Iterable[int], claims: Mapping[str, Claim]) -> dict[str, list[int]]:
    """Balanced, state-aware assignment of `partitions` to the members of `claims`.

    Partitions are placed in order of how much state their best candidate already holds, each
    to the member with the most stored offsets for it that is still under its quota (ties by
    member id, so every leader computes the same plan)."""
    members = sorted(claims)
    plan: dict[str, list[int]] = {m: [] for m in members}
    if not members:
        return plan
    parts = sorted(set(partitions))
    base, extra = divmod(len(parts), len(members))
    # The members with most state overall may take the `extra` larger shares.
    by_state = sorted(members, key=lambda m: (-sum(claims[m].stored_offsets.values()), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_state)}

    def stored(member: str, partition: int) -> int:
        return claims[member].stored_offsets.get(partition, -1)

    order = sorted(parts, key=lambda p: (-max(stored(m, p) for m in members), p))
    for partition in order:
        candidates = [m for m in members if len(plan[m]) < quota[m]]
        best = max(candidates, key=lambda m: (stored(m, partition), -members.index(m)))
        plan[best].append(partition)
    return {m: sorted(ps) for m, ps in plan.items()}


def owners_of(plan: Mapping[str, list[int]], claims: Mapping[str, Claim]) -> dict[int, str]:
    """partition -> address of its owner."""
    return {p: claims[m].address for m, ps in plan.items() for p in ps}


def furthest_stored(partitions: Iterable[int], claims: Mapping[str, Claim]) -> dict[int, int]:
    """partition -> the most any member's store holds of it (members that hold none: left out).
    A member taken back after a break in its group generations keeps answering for a partition
    only when no member's store is further along in it (`viewevents.consumer.CatchUp`)."""
    out: dict[int, int] = {}
    for partition in partitions:
        held = [
            c.stored_offsets[partition] for c in claims.values() if partition in c.stored_offsets
        ]
        if held:
            out[partition] = max(held)
    return out


def encode_owners(
    owners: Mapping[int, str], furthest: Mapping[int, int] | None = None, generation_hint: int = 0
) -> bytes:
    return json.dumps(
        {
            "owners": {str(p): a for p, a in owners.items()},
            "furthest": {str(p): o for p, o in (furthest or {}).items()},
            "hint": generation_hint,
        }
    ).encode()


def decode_owners(data: bytes) -> dict[int, str]:
    return _decode_map(data, "owners", str)


def decode_furthest(data: bytes) -> dict[int, int]:
    return _decode_map(data, "furthest", int)


def _decode_map(data: bytes, name: str, value: Callable[[Any], V]) -> dict[int, V]:
    """The partition-keyed map `name` of an assignment's user data; empty when unreadable."""
    try:
        return {int(p): value(v) for p, v in json.loads(data or b"{}").get(name, {}).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


class OwnershipAssignor(AbstractPartitionAssignor):
    """The group protocol's assignor: claims in, plan and the owners map out.

    One instance per consumer (aiokafka calls it on the object it is given); `claim()` is
    asked at every join so the stored offsets are current, and `on_owners` hears the map that
    came with this member's assignment."""

    def __init__(
        self, claim: Callable[[], Claim], on_owners: Callable[[dict[int, str]], None]
    ) -> None:
        self._claim = claim
        self._on_owners = on_owners
        self.owners: dict[int, str] = {}
        # partition -> the furthest any member's store was at the latest assignment's joins.
        self.furthest: dict[int, int] = {}

    @property
    def name(self) -> str:
        return ASSIGNOR_NAME

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            ASSIGNOR_VERSION, sorted(topics), self._claim().encode()
        )

    def assign(
        self, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """Each topic's partitions go only to the members subscribed to it (a group shared by
        deployments of different topics, e.g. a mistyped topic, must not hand a member partitions
        it did not ask for: aiokafka stops such a consumer), and each member hears the owners of
        its own topics (services subscribe to one topic, so partition numbers do not clash)."""
        claims = {m: Claim.decode(meta.user_data) for m, meta in members.items()}
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        per_topic: dict[str, dict[str, list[int]]] = {}
        owners: dict[str, dict[int, str]] = {}
        furthest: dict[str, dict[int, int]] = {}
        for topic in topics:
            subscribed = {m: c for m, c in claims.items() if topic in members[m].subscription}
            partitions = cluster.partitions_for_topic(topic) or set()
            per_topic[topic] = plan_assignment(partitions, subscribed)
            owners[topic] = owners_of(per_topic[topic], subscribed)
            furthest[topic] = furthest_stored(partitions, subscribed)
        assignment: dict[str, ConsumerProtocolMemberAssignment] = {}
        for member, meta in members.items():
            mine = sorted(set(meta.subscription))
            heard: dict[int, str] = {}
            ahead: dict[int, int] = {}
            for topic in mine:
                heard.update(owners[topic])
                ahead.update(furthest[topic])
            assignment[member] = ConsumerProtocolMemberAssignment(
                ASSIGNOR_VERSION,
                [(t, per_topic[t][member]) for t in mine if per_topic[t][member]],
                encode_owners(heard, ahead),
            )
        log.info(
            "assigned partitions: %s",
            {
                claims[m].address or m: {t: ps[m] for t, ps in per_topic.items() if m in ps}
                for m in members
            },
        )
        return assignment

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.owners = decode_owners(assignment.user_data)
        self.furthest = decode_furthest(assignment.user_data)
        self._on_owners(dict(self.owners))


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def advertised_address(bind: str, configured: str = "", hostname: str | None = None) -> str:
    """The address other instances use to reach this one: `configured` when set, else the
    bind address when its host is concrete, else this host's name with the bind port (a
    wildcard bind such as 0.0.0.0 or [::] is not an address anyone can dial)."""
    if configured:
        return configured
    host, _, port = bind.rpartition(":")
    if host not in WILDCARD_HOSTS:
        return bind
    return f"{hostname if hostname is not None else socket.gethostname()}:{port}"
