"""The freshness protocol from the caller's side: every answer carries the consumer position,
so a test waits until the position covers what it uploaded before it checks the answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc

from tests.support.waits import wait_for
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents.v1 import view_event_pb2 as ve

# While a consumer restarts or has not seen an item yet; anything else is a real failure.
NOT_YET = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def caught_up_position(offsets: Mapping[int, int]) -> ve.ConsumerPosition:
    """The ConsumerPosition message of a caught-up consumer at `offsets` (for test fakes)."""
    return ve.ConsumerPosition(
        partitions=[ve.PartitionOffset(partition=p, offset=o) for p, o in sorted(offsets.items())],
        caught_up=True,
    )


def stats_position(channel: grpc.Channel) -> ve.ConsumerPosition:
    """The stats service's position (from the cheapest query that carries it)."""
    return (
        stats_grpc.StatsServiceStub(channel)
        .ListTopMedia(
            stats_pb.ListTopMediaRequest(
                start_time={"seconds": 0}, end_time={"seconds": 60}, limit=1
            ),
            timeout=5,
        )
        .position
    )


def recommender_position(channel: grpc.Channel) -> ve.ConsumerPosition:
    """The recommender's position (a fallback answer for user 1 is enough)."""
    return (
        rec_grpc.RecommenderServiceStub(channel)
        .RecommendForUser(rec_pb.RecommendForUserRequest(user_id=1), timeout=5)
        .position
    )


def applied(position: ve.ConsumerPosition) -> int:
    """Records applied so far: the sum of the partitions' offsets (on a fresh topic)."""
    return sum(p.offset for p in position.partitions)


def covers(position: ve.ConsumerPosition, targets: Mapping[int, int] | int) -> bool:
    """Every partition reached its target offset; an int target is a total record count."""
    if isinstance(targets, int):
        return applied(position) >= targets
    offsets = {p.partition: p.offset for p in position.partitions}
    return all(offsets.get(p, 0) >= end for p, end in targets.items())


def applied_records(
    address: str, read: Callable[[grpc.Channel], ve.ConsumerPosition]
) -> int | None:
    """Records applied by the service at `address`, or None if it does not answer (killed)."""
    try:
        with grpc.insecure_channel(address) as channel:
            return applied(read(channel))
    except grpc.RpcError:
        return None


def wait_applied(
    address: str,
    read: Callable[[grpc.Channel], ve.ConsumerPosition],
    targets: Mapping[int, int] | int,
    timeout: float = 120.0,
) -> ve.ConsumerPosition:
    """Until the position of the service at `address` covers `targets`; returns that position."""
    last: list[ve.ConsumerPosition] = []

    def reached() -> ve.ConsumerPosition | None:
        try:
            position = read(channel)
        except grpc.RpcError as error:
            if error.code() in NOT_YET:
                return None
            raise
        last[:] = [position]
        return position if covers(position, targets) else None

    with grpc.insecure_channel(address) as channel:
        return wait_for(
            reached,
            timeout,
            message=lambda: f"{address} did not reach {targets}; last position {last}",
        )
