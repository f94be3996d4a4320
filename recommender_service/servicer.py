"""gRPC handlers of viewevents.v1.RecommenderService: validate, query, convert to protobuf.

An instance that owns every partition answers from its own state (and `QueryEngine`'s cache).
Any other instance answers completely through `Fanout`, which gathers every owner's partial
sums; when some partition cannot be answered for, UNAVAILABLE with RetryInfo naming it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf import timestamp_pb2

from recommender_service.fanout import Fanout, PartitionServicer
from recommender_service.hot_rows import HotRows
from recommender_service.query_engine import QueryEngine, UnknownItem
from recommender_service.similarity import Metric
from recommender_service.view import Stamp
from viewevents import scatter
from viewevents.rpc.errors import (
    Unparseable,
    abort_bad_request,
    abort_unavailable,
    reject_unparseable,
)
from viewevents.v1 import recommender_partition_service_pb2 as ppb
from viewevents.v1 import recommender_service_pb2 as pb
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 10
Violation = view_event_pb2.FieldViolation
_METRICS = {
    pb.SIMILARITY_METRIC_UNSPECIFIED: Metric.COSINE,
    pb.SIMILARITY_METRIC_COSINE: Metric.COSINE,
    pb.SIMILARITY_METRIC_PEARSON: Metric.PEARSON,
}


class PositionSource(Protocol):
    """What the servicer needs from the consumer: assigned partitions and catch-up state."""

    positions: dict[int, int]

    @property
    def caught_up(self) -> object: ...


def _positive(field: str, value: int) -> list[Violation]:
    if value > 0:
        return []
    if value == 0:
        return [Violation(field=field, description=f"{field} is required", reason="REQUIRED")]
    return [
        Violation(
            field=field, description=f"{field} must be positive, got {value}", reason="NOT_POSITIVE"
        )
    ]


def _limit(value: int, max_limit: int) -> list[Violation]:
    if 0 <= value <= max_limit:
        return []
    return [
        Violation(
            field="limit",
            reason="OUT_OF_RANGE",
            description=f"limit must be 0 (meaning {DEFAULT_LIMIT}) to {max_limit}, got {value}",
        )
    ]


def validate_similar(request: pb.GetSimilarMediaRequest, max_limit: int) -> list[Violation]:
    """Every problem of a GetSimilarMedia request (empty when valid)."""
    violations = _positive("media_id", request.media_id) + _limit(request.limit, max_limit)
    if request.metric not in _METRICS:
        violations.append(
            Violation(
                field="metric",
                reason="UNKNOWN_VALUE",
                description=f"metric has unknown value {request.metric}; use "
                "SIMILARITY_METRIC_COSINE or SIMILARITY_METRIC_PEARSON",
            )
        )
    return violations


def validate_recommend(request: pb.RecommendForUserRequest, max_limit: int) -> list[Violation]:
    """Every problem of a RecommendForUser request (empty when valid)."""
    return _positive("user_id", request.user_id) + _limit(request.limit, max_limit)


def position_message(
    stamp: Stamp, consumer: PositionSource | None
) -> view_event_pb2.ConsumerPosition:
    """The position of the state an answer was computed from.

    Offsets come from the same RocksDB snapshot as the answer (`Stamp.offset`), for every
    owned partition: the answer may have been computed, or cached, before a partition's first
    batch committed, and the consumer's position now would claim records its state lacks."""
    owned = set(consumer.positions) if consumer is not None else set()
    partitions = sorted(owned or set(stamp.offsets))
    caught_up = bool(consumer.caught_up.is_set()) if consumer is not None else True  # type: ignore[attr-defined]
    return view_event_pb2.ConsumerPosition(
        partitions=[
            view_event_pb2.PartitionOffset(partition=p, offset=stamp.offset(p)) for p in partitions
        ],
        event_time_watermark=(
            timestamp_pb2.Timestamp(seconds=stamp.watermark)
            if stamp.watermark is not None
            else None
        ),
        caught_up=caught_up,
    )


def owns_every_partition(consumer: object) -> bool:
    """The instance owns every partition and has caught up on each since its latest
    assignment, so its own view is the complete state. A partition it owns but is still
    replaying (just taken over from a killed member) must not be answered from: the fan-out
    then asks this instance itself, which refuses, and the answer is UNAVAILABLE."""
    owns_all = getattr(consumer, "owns_all", None)
    if owns_all is None:
        return True
    if not owns_all():
        return False
    answerable = getattr(consumer, "answerable", None)
    owners = getattr(consumer, "owners", None)
    return answerable is None or owners is None or set(owners) <= set(answerable())


def warmer_ready(consumer: Any) -> Callable[[], bool]:
    """When the neighbour-list cache is worth warming: caught up, and answering from the local
    view. An instance that owns only some partitions answers every query by fan-out, so lists
    of its own view would never be read (py-spy, 2 instances: the warmer of the instance not
    asked kept computing them)."""
    return lambda: bool(consumer.caught_up.is_set()) and owns_every_partition(consumer)


class RecommenderServicer:
    """Implements viewevents.v1.RecommenderService and, with a fan-out, the internal
    viewevents.v1.RecommenderPartitionService its peers call (served at the same address)."""

    def __init__(
        self,
        engine: QueryEngine,
        consumer: PositionSource | None,
        fanout: Fanout | None = None,
        hot_rows: HotRows | None = None,
    ) -> None:
        self.engine = engine
        self.consumer = consumer
        self.fanout = fanout
        self.hot_rows = hot_rows
        self.partitions = PartitionServicer(fanout.ownership) if fanout is not None else None
        self.max_limit = engine.settings.max_limit
        self._fanout_warmer: asyncio.Task[None] | None = None

    def start_fanout_warmer(self, consumer: Any) -> None:
        """Keep the fan-out lists of the most watched items (by this instance's own view, a
        proxy: it covers only its users) warm while this instance answers by fan-out; on the
        running event loop, since warming calls the other owners."""
        fanout = self.fanout
        if fanout is None:
            return

        def popular() -> list[int]:
            view = fanout.ownership.source()
            return [int(m) for m in view.ids[view.popular_order()[: fanout.cache.capacity]]]

        def ready() -> bool:
            return bool(consumer.caught_up.is_set()) and not owns_every_partition(consumer)

        self._fanout_warmer = asyncio.get_running_loop().create_task(
            fanout.keep_warm(ready, popular), name="fanout-warmer"
        )

    def close(self) -> None:
        """Called by the bootstrap on shutdown: stops the cache warmers."""
        self.engine.stop_warmer()
        if self._fanout_warmer is not None:
            self._fanout_warmer.cancel()

    def memory_bytes(self) -> dict[str, int]:
        """The bytes of this service's own bounded caches, for the bootstrap's memory line
        (their bounds: docs/architecture.md, the memory budget)."""
        found = {"lists": self.engine.cache_bytes()}
        if self.hot_rows is not None:
            found["hot_rows"] = self.hot_rows.bytes
        if self.fanout is not None:
            found["fanout_lists"] = self.fanout.cache.bytes()
        return found

    def _owns_all(self) -> bool:
        """Whether to answer from the local view; also drops the list cache of the other way
        of answering, so that the two caches, which share one memory share, are never both
        full (an instance switches when partitions move)."""
        local = owns_every_partition(self.consumer)
        if local:
            if self.fanout is not None and len(self.fanout.cache):
                self.fanout.cache.clear()
        elif self.engine.cached_items():
            self.engine.clear()
        return local

    async def _require_every_partition(self, context: grpc.aio.ServicerContext) -> None:
        """UNAVAILABLE (with RetryInfo) unless this instance owns every partition; only
        reached when there is no fan-out to complete its answers."""
        owners = dict(getattr(self.consumer, "owners", {}))
        mine = sorted(self.consumer.positions) if self.consumer is not None else []
        await abort_unavailable(
            context,
            (
                "this recommender instance does not own every partition (owns "
                f"{mine or 'none'} of {sorted(owners) or 'an unknown set'}) and cannot ask the "
                "other owners"
            ),
        )

    async def GetSimilarMedia(
        self, request: pb.GetSimilarMediaRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> pb.GetSimilarMediaResponse:
        await reject_unparseable(context, request)
        assert isinstance(request, pb.GetSimilarMediaRequest)
        violations = validate_similar(request, self.max_limit)
        if violations:
            await abort_bad_request(context, "invalid GetSimilarMedia request", violations)
        metric, limit = _METRICS[request.metric], request.limit or DEFAULT_LIMIT
        try:
            if self._owns_all():
                # In a worker thread, like every query computation: on the event loop it would
                # stall the consumer's fetching and batch hand-off for the whole computation
                # (the soak: RecommendForUser took ~300 ms at 2M events, two clients querying
                # without pause, and the consumer fell behind 3,000 events/s).
                ranked, stamp = await asyncio.to_thread(
                    self.engine.similar, request.media_id, metric, limit
                )
                position = position_message(stamp, self.consumer)
            elif self.fanout is None:
                await self._require_every_partition(context)
            else:
                ranked, position = await self.fanout.similar(request.media_id, metric, limit)
        except UnknownItem:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"media {request.media_id} is unknown: no event for it was applied",
            )
        except scatter.Incomplete as incomplete:
            log.info("GetSimilarMedia UNAVAILABLE: %s", incomplete)
            await abort_unavailable(context, str(incomplete))
        return pb.GetSimilarMediaResponse(
            similar_media=[
                pb.SimilarMedia(media_id=m, score=s, co_viewers=c)
                for m, s, c in zip(
                    ranked.ids.tolist(), ranked.scores.tolist(), ranked.co_viewers.tolist()
                )
            ],
            position=position,
        )

    async def RecommendForUser(
        self, request: pb.RecommendForUserRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> pb.RecommendForUserResponse:
        await reject_unparseable(context, request)
        assert isinstance(request, pb.RecommendForUserRequest)
        violations = validate_recommend(request, self.max_limit)
        if violations:
            await abort_bad_request(context, "invalid RecommendForUser request", violations)
        limit = request.limit or DEFAULT_LIMIT
        if self._owns_all():
            result = await asyncio.to_thread(self.engine.recommend, request.user_id, limit)
            ids, scores, fallback = result.ids, result.scores, result.fallback
            position = position_message(result.stamp, self.consumer)
        elif self.fanout is None:
            await self._require_every_partition(context)
        else:
            try:
                ids, scores, fallback, position = await self.fanout.recommend(
                    request.user_id, limit
                )
            except scatter.Incomplete as incomplete:
                log.info("RecommendForUser UNAVAILABLE: %s", incomplete)
                await abort_unavailable(context, str(incomplete))
        return pb.RecommendForUserResponse(
            recommendations=[
                pb.Recommendation(media_id=m, score=s)
                for m, s in zip(ids.tolist(), scores.tolist())
            ],
            fallback=fallback,
            position=position,
        )

    # --- internal: viewevents.v1.RecommenderPartitionService ----------------------------------

    async def GetItemPartials(
        self, request: ppb.GetItemPartialsRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> ppb.GetItemPartialsResponse:
        if self.partitions is None:
            await abort_unavailable(context, "this instance does not serve partials")
        assert self.partitions is not None
        return await self.partitions.GetItemPartials(request, context)

    async def GetUserWindow(
        self, request: ppb.GetUserWindowRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> ppb.GetUserWindowResponse:
        if self.partitions is None:
            await abort_unavailable(context, "this instance does not serve partials")
        assert self.partitions is not None
        return await self.partitions.GetUserWindow(request, context)
