"""ListTopMedia across several stats instances: any instance ranks every partition exactly.

Three instances split an 8-partition topic (a fourth runs alone in its own group). After a
noisy upload, every instance answers ListTopMedia for every metric over several ranges (the
whole span with minute-unaligned edges, one day, one hour, unaligned edges inside a day)
exactly as brute force over the uploaded file and as the single instance, with the pages
walked to the end through a different instance for each consecutive page (page tokens are
signed with the shared secret).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import ServiceProcess, unique_name, wait_for
from tests.support.broker import end_offsets
from tests.support.data import STATS_FILE, accepted_events, first_copies, generated_events
from tests.support.oracles import Expected
from tests.support.stats_group import StatsGroup
from viewevents.v1 import stats_partition_service_pb2 as ppb
from viewevents.v1 import stats_partition_service_pb2_grpc as ppb_grpc
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc

PARTITIONS = 8
ANSWERED_BY = "x-viewevents-answered-by"
METRICS = (
    pb.TOP_MEDIA_METRIC_VIEW_TIME,
    pb.TOP_MEDIA_METRIC_STARTS,
    pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS,
)
DAY, HOUR, MINUTE = 86_400, 3_600, 60


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


@pytest.fixture
def cluster(tmp_path: Path, kafka_bootstrap: str) -> Iterator[StatsGroup]:
    made = StatsGroup(tmp_path, kafka_bootstrap, PARTITIONS, prefix="top")
    yield made
    made.stop()


def request(
    start: int, end: int, metric: pb.TopMediaMetric, limit: int, token: str = ""
) -> pb.ListTopMediaRequest:
    return pb.ListTopMediaRequest(
        start_time=_ts(start), end_time=_ts(end), metric=metric, limit=limit, page_token=token
    )


def caught_up(address: str, start: int, end: int, targets: dict[int, int]) -> bool:
    """A complete ranking whose position reached `targets` on every partition."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.StatsServiceStub(channel).ListTopMedia(
                request(start, end, METRICS[0], 1), timeout=30
            )
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return False
        raise
    offsets = {p.partition: p.offset for p in reply.position.partitions}
    return set(offsets) == set(targets) and all(offsets[p] >= o for p, o in targets.items())


def walk(
    stubs: list[tuple[str, pb_grpc.StatsServiceStub]],
    start: int,
    end: int,
    metric: pb.TopMediaMetric,
    limit: int,
    first: int,
) -> list[tuple]:
    """Every page, page i asked of instance (first + i) mod n; checks who answered."""
    got: list[tuple] = []
    token = ""
    page = 0
    while True:
        address, stub = stubs[(first + page) % len(stubs)]
        reply, call = stub.ListTopMedia.with_call(
            request(start, end, metric, limit, token), timeout=60
        )
        assert dict(call.trailing_metadata()).get(ANSWERED_BY) == address
        assert [p.partition for p in reply.position.partitions] == list(range(PARTITIONS))
        assert len(reply.media) <= limit
        got += [
            (t.media_id, t.rank, t.view_time_seconds, t.starts, t.unique_viewers)
            for t in reply.media
        ]
        token = reply.next_page_token
        page += 1
        if not token:
            return got


def test_every_instance_ranks_every_partition_exactly_page_after_page(
    cluster: StatsGroup, kafka_bootstrap: str, tmp_path: Path
) -> None:
    events = generated_events(tmp_path / "views.jsonl", 30_000, seed=91, **STATS_FILE)
    cluster.ingest.start()
    members = [cluster.add("a"), cluster.add("b"), cluster.add("c")]
    single = cluster.add("single", group=unique_name("single"))
    cluster.ingest.wait_serving()
    cluster.send(events)
    expected = Expected(first_copies(accepted_events(events, cluster.config)))
    targets = end_offsets(kafka_bootstrap, cluster.config.view_topic)
    assert len(targets) == PARTITIONS
    low = min(r[3] for r in expected.rows)
    high = max(r[3] for r in expected.rows) + 1
    for process in (*members, single):

        def done(p: ServiceProcess = process) -> bool:
            return caught_up(p.address, low, high, targets)

        def not_done(p: ServiceProcess = process) -> str:
            return f"{p.address} not complete: {p.tail()}"

        wait_for(done, 180, message=not_done)

    busiest_day = max(
        range(low // DAY * DAY, high, DAY),
        key=lambda d: sum(d <= r[3] < d + DAY for r in expected.rows),
    )
    ranges = [
        (low - 37, high + 1_234),  # the whole span, minute-unaligned edges
        (busiest_day, busiest_day + DAY),  # one whole day
        (busiest_day + 13 * HOUR, busiest_day + 14 * HOUR),  # one hour
        (busiest_day + 5 * HOUR + 17 * MINUTE + 13, busiest_day + 9 * HOUR + 41),  # ragged
    ]
    everyone = [*members, single]
    channels = [grpc.insecure_channel(p.address) for p in everyone]
    try:
        stubs = [(p.address, pb_grpc.StatsServiceStub(c)) for p, c in zip(everyone, channels)]
        for number, (start, end) in enumerate(ranges):
            rounded = (start // MINUTE * MINUTE, -(-end // MINUTE) * MINUTE)
            for metric in METRICS:
                want = [(m, rank, v, s, u) for m, rank, v, s, u in expected.top(*rounded, metric)]
                assert want, (start, end)
                limit = max(1, len(want) // 5 + number)  # about five pages, odd sizes
                alone = walk(stubs[3:], start, end, metric, limit, 0)
                assert alone == want, (number, metric)
                for first in range(len(stubs)):  # each instance serves a first page
                    assert walk(stubs, start, end, metric, limit, first) == want, (
                        number,
                        metric,
                        first,
                    )

        # The internal service: listed by reflection, strict about its input, and answered
        # only from partitions the instance owns and has caught up on.
        with grpc.insecure_channel(members[0].address) as channel:
            listed = next(
                iter(
                    reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                    )
                )
            )
            assert "viewevents.v1.StatsPartitionService" in {
                s.name for s in listed.list_services_response.service
            }
            partials = ppb_grpc.StatsPartitionServiceStub(channel)
            for bad, code in (
                (dict(partitions=[]), grpc.StatusCode.INVALID_ARGUMENT),
                (dict(partitions=list(range(PARTITIONS))), grpc.StatusCode.UNAVAILABLE),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    list(
                        partials.StreamMediaPartials(
                            ppb.StreamMediaPartialsRequest(
                                start_time=_ts(low // MINUTE * MINUTE),
                                end_time=_ts(high // MINUTE * MINUTE),
                                **bad,
                            ),
                            timeout=30,
                        )
                    )
                assert raised.value.code() == code, raised.value.details()

        # One figure for the report: the whole span by view time, 10 items, a few times.
        for name, (_, stub) in (("group member", stubs[0]), ("single", stubs[3])):
            took = []
            for _ in range(5):
                began = time.monotonic()
                stub.ListTopMedia(request(*ranges[0], METRICS[0], 10), timeout=60)
                took.append(time.monotonic() - began)
            print(f"ListTopMedia whole span via {name}: median {1000 * sorted(took)[2]:.0f} ms")
    finally:
        for channel in channels:
            channel.close()
