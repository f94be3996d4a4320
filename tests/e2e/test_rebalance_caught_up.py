"""Two stats instances in one consumer group: while the second joins and leaves, every answer of
the first that says caught_up=true lists every partition (it asks the other instance for the
partitions it does not own) and is exact, and its health is NOT_SERVING while a new assignment
is being caught up. Which instance owns which partition is probed with the peer header
(`x-viewevents-partitions`), which an instance answers only for partitions it owns and has
caught up on.

Expected values are computed here from the uploaded events, split by partition with Kafka's
default partitioner on the record key (the user id), independently of the services' code.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import ServiceProcess, free_port, test_config, unique_name
from tests.support.data import make_events
from viewevents.kafka import KeyPartitioner, user_key
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload

PARTITIONS = 4
HEARTBEAT = 30
ALL = frozenset(range(PARTITIONS))


class Truth:
    """(starts, view seconds, unique viewers) per media and partition, by brute force."""

    def __init__(self) -> None:
        self.events: dict[str, ve.ViewEvent] = {}
        self.partitioner = KeyPartitioner(PARTITIONS)

    def add(self, events: list[ve.ViewEvent]) -> None:
        self.events.update((e.event_id, e) for e in events)

    def totals(self, media: int, partitions: frozenset[int]) -> tuple[int, int, int]:
        rows = [
            e
            for e in self.events.values()
            if e.media_id == media and self.partitioner(user_key(e.user_id)) in partitions
        ]
        return (
            sum(e.event_type == 1 for e in rows),
            HEARTBEAT * sum(e.event_type == 2 for e in rows),
            len({e.user_id for e in rows}),
        )

    def media_in_every_partition(self, count: int) -> list[int]:
        seen: dict[int, set[int]] = defaultdict(set)
        for e in self.events.values():
            seen[e.media_id].add(self.partitioner(user_key(e.user_id)))
        return sorted(m for m, parts in seen.items() if parts == set(ALL))[:count]


class Poller(threading.Thread):
    """Asks one instance again and again; keeps every caught_up=true answer and health seen.

    Answers are kept only while `phase` is set: a phase is a quiet time in which everything
    uploaded so far was acknowledged and the instance's own partitions applied it, so that a
    caught-up answer must equal the brute force over all uploaded events of its partitions.
    """

    def __init__(self, address: str, media: list[int]) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.media = media
        self.phase: int | None = None
        self.answers: list[tuple[int, frozenset[int], int, tuple[int, int, int]]] = []
        self.health: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stats = pb_grpc.StatsServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while not self.done.is_set():
                try:
                    self.health.append(
                        health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    )
                    for media in self.media:
                        phase = self.phase
                        reply = stats.GetMediaStats(
                            pb.GetMediaStatsRequest(media_id=media), timeout=2
                        )
                        if reply.position.caught_up and phase is not None and phase == self.phase:
                            s = reply.stats
                            self.answers.append(
                                (
                                    phase,
                                    frozenset(p.partition for p in reply.position.partitions),
                                    media,
                                    (s.starts, s.view_time_seconds, s.unique_viewers),
                                )
                            )
                except grpc.RpcError:
                    pass
                time.sleep(0.02)


def position(address: str, media: int) -> tuple[frozenset[int], dict[int, int], bool]:
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.StatsServiceStub(channel).GetMediaStats(
            pb.GetMediaStatsRequest(media_id=media), timeout=5
        )
    offsets = {p.partition: p.offset for p in reply.position.partitions}
    return frozenset(offsets), offsets, reply.position.caught_up


def owned(address: str, media: int) -> frozenset[int]:
    """The partitions the instance answers for from its own state (owned and caught up)."""
    found = set()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.StatsServiceStub(channel)
        for partition in ALL:
            try:
                stub.GetMediaStats(
                    pb.GetMediaStatsRequest(media_id=media),
                    timeout=5,
                    metadata=[("x-viewevents-partitions", str(partition))],
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                continue
            found.add(partition)
    return frozenset(found)


def wait_for(condition, what: str, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_answers_cover_exactly_the_caught_up_partitions_through_rebalances(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    group = unique_name("rebalance")
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        stats_group=group,
        topic_partitions=PARTITIONS,
    )
    first = config.replace(
        stats_address=f"127.0.0.1:{free_port()}", stats_state_dir=str(tmp_path / "a")
    )
    second = config.replace(
        stats_address=f"127.0.0.1:{free_port()}", stats_state_dir=str(tmp_path / "b")
    )
    ingest = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "ingest.log"
    ).start()
    a = ServiceProcess("stats_service", first, first.stats_address, tmp_path / "a.log").start()
    ingest.wait_serving()
    a.wait_serving()
    truth = Truth()
    truths: dict[int, Truth] = {}

    def send(events: list) -> dict[int, int]:
        truth.add(events)
        with grpc.insecure_channel(config.ingest_address, options=CHANNEL_OPTIONS) as channel:
            summary = upload(channel, iter(events), timeout=120)
        return {p.partition: p.offset for p in summary.positions}

    ends = send(make_events(12_000, seed=401, bad_share=0)[0])
    assert set(ends) == ALL
    media = truth.media_in_every_partition(6)
    assert media
    wait_for(lambda: position(a.address, media[0])[1] == ends, "A applied the first upload")

    truths[1] = Truth()
    truths[1].add(list(truth.events.values()))
    poller = Poller(a.address, media)
    poller.phase = 1
    poller.start()
    b = ServiceProcess("stats_service", second, second.stats_address, tmp_path / "b.log").start()
    try:
        b.wait_serving()

        def split() -> bool:
            mine, theirs = owned(a.address, media[0]), owned(b.address, media[0])
            return bool(mine) and bool(theirs) and mine | theirs == ALL and not mine & theirs

        wait_for(split, "A and B own disjoint halves and are caught up")
        mine = owned(a.address, media[0])
        # New events while B owns part of the topic: A's copy of B's partitions falls behind.
        poller.phase = None
        ends = send(make_events(30_000, seed=402, bad_share=0)[0])
        # A's answers now cover B's partitions too (asked of B): wait until both applied.
        wait_for(
            lambda: all(position(a.address, media[0])[1].get(p, -1) >= ends[p] for p in ALL),
            "A's answers reached the new end offsets on every partition",
        )
        assert mine
        truths[2] = truth
        poller.phase = 2
    finally:
        b.stop()
    # A alone again: it owns everything and must catch up on B's former partitions first.
    a.wait_serving()
    wait_for(lambda: position(a.address, media[0])[1] == ends, "A applied everything")
    # A serves again only moments before this point; keep polling until the poller has seen it
    # (stopping at once left phase 2 without a single answer when the poller was mid-sleep).
    wait_for(
        lambda: any(phase == 2 for phase, _, _, _ in list(poller.answers)),
        "a caught-up answer from A alone after the second rebalance",
    )
    poller.done.set()
    poller.join(10)

    wrong = [
        (phase, parts, m, got, truths[phase].totals(m, parts))
        for phase, parts, m, got in poller.answers
        if got != truths[phase].totals(m, parts)
    ]
    assert not wrong, f"{len(wrong)} caught_up answers not exact for their partitions: {wrong[:5]}"
    listed = {parts for _, parts, _, _ in poller.answers}
    assert listed == {ALL}, listed  # complete answers only, whoever owned what
    assert {phase for phase, _, _, _ in poller.answers} == {1, 2}
    assert health_pb2.HealthCheckResponse.NOT_SERVING in poller.health, (
        "health never left SERVING through two rebalances"
    )
    with grpc.insecure_channel(a.address) as channel:
        stub = pb_grpc.StatsServiceStub(channel)
        for m in sorted({e.media_id for e in truth.events.values()}):
            s = stub.GetMediaStats(pb.GetMediaStatsRequest(media_id=m), timeout=10).stats
            assert (s.starts, s.view_time_seconds, s.unique_viewers) == truth.totals(m, ALL), m
    assert a.stop() == 0
    ingest.stop()
