"""gRPC handlers of viewevents.v1.StatsService: check arguments, read RocksDB, answer.

Every answer carries the consumer position read *before* the state, so the state read is at
least as fresh as the position says. GetMediaStats is a handful of point reads and runs on the
event loop; trends and rankings scan ranges and run in a worker thread so that a long scan
does not hold up the cheap calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from stats_service import request_parsing as queries
from stats_service.reader import StatsReader, Totals
from stats_service.request_parsing import Limits, TopQuery, TrendQuery
from viewevents.consumer import ExactlyOnceConsumer
from viewevents.rpc.errors import abort_bad_request, reject_unparseable
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["StatsService"]


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def media_stats(media_id: int, totals: Totals) -> pb.MediaStats:
    return pb.MediaStats(
        media_id=media_id, view_time_seconds=totals.view_time, starts=totals.starts,
        stops=totals.stops, ends=totals.ends, unique_viewers=totals.uniques,
        completion_rate=totals.ends / totals.starts if totals.starts else 0.0,
        average_view_time_seconds_per_viewer=(
            totals.view_time / totals.uniques if totals.uniques else 0.0),
        first_event_time=_ts(totals.first), last_event_time=_ts(totals.last))


class StatsServicer:
    """Implements viewevents.v1.StatsService over a StatsReader."""

    def __init__(self, reader: StatsReader, consumer: ExactlyOnceConsumer | Any,
                 limits: Limits, page_token_secret: bytes | None = None) -> None:
        self.reader = reader
        self.consumer = consumer
        self.limits = limits
        self.page_token_secret = page_token_secret  # None: the process's random secret
        # Scans (trends, rankings) hold memory while they run: a few at a time, others queue.
        self._scans = asyncio.Semaphore(max(1, limits.max_concurrent_scans))

    def _read_position(self) -> tuple[view_event_pb2.ConsumerPosition, list[int]]:
        """The position to report and the partitions to read: those this instance owns, or
        (before the first assignment) every partition in the store."""
        position = self.consumer.position()
        partitions = [p.partition for p in position.partitions]
        return position, partitions or self.reader.stored_partitions()

    async def _not_found(self, context: grpc.aio.ServicerContext, media_id: int,
                         position: view_event_pb2.ConsumerPosition) -> None:
        offsets = ", ".join(f"{p.partition}:{p.offset}" for p in position.partitions)
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"media item {media_id} has no events (consumer at offsets [{offsets}], "
            f"caught_up={position.caught_up})")

    async def GetMediaStats(self, request: pb.GetMediaStatsRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetMediaStatsResponse:
        await reject_unparseable(context, request)
        violations: list[view_event_pb2.FieldViolation] = []
        queries.check_media_id(request.media_id, violations)
        if violations:
            await abort_bad_request(context, "invalid GetMediaStats request", violations)
        position, partitions = self._read_position()
        totals = self.reader.totals(partitions, request.media_id)
        if totals is None:
            await self._not_found(context, request.media_id, position)
        assert totals is not None
        return pb.GetMediaStatsResponse(stats=media_stats(request.media_id, totals),
                                        position=position)

    async def GetMediaTrend(self, request: pb.GetMediaTrendRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetMediaTrendResponse:
        await reject_unparseable(context, request)
        query, violations = queries.parse_trend(request, self.limits)
        if query is None:
            await abort_bad_request(context, "invalid GetMediaTrend request", violations)
        assert query is not None
        position, partitions = self._read_position()
        if self.reader.totals(partitions, query.media_id) is None:
            await self._not_found(context, query.media_id, position)
        async with self._scans:
            response = await asyncio.to_thread(self._trend, query, partitions)
        response.position.CopyFrom(position)
        return response

    def _trend(self, query: TrendQuery, partitions: Sequence[int]) -> pb.GetMediaTrendResponse:
        found = self.reader.trend(partitions, query.media_id, query.size, query.start, query.end)
        starts = (queries.empty_bucket_starts(query.start, query.end, query.size)
                  if query.include_empty else sorted(found))
        buckets = []
        for start in starts:
            row = found.get(start, (0, 0, 0, 0, 0))
            buckets.append(pb.TrendBucket(
                start_time=_ts(start), view_time_seconds=row[0], starts=row[1], stops=row[2],
                ends=row[3], unique_viewers=row[4]))
        granularity = {v: g for g, v in queries.GRANULARITY_SECONDS.items()}[query.size]
        viewers = self.reader.viewers(partitions, query.media_id, query.start, query.end)
        return pb.GetMediaTrendResponse(media_id=query.media_id, granularity=granularity,
                                        buckets=buckets, unique_viewers=viewers)

    async def ListTopMedia(self, request: pb.ListTopMediaRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListTopMediaResponse:
        await reject_unparseable(context, request)
        query, violations = queries.parse_top(request, self.limits, self.page_token_secret)
        if query is None:
            await abort_bad_request(context, "invalid ListTopMedia request", violations)
        assert query is not None
        position, partitions = self._read_position()
        async with self._scans:
            response = await asyncio.to_thread(self._top, query, partitions)
        response.position.CopyFrom(position)
        return response

    def _top(self, query: TopQuery, partitions: Sequence[int]) -> pb.ListTopMediaResponse:
        """The ranking streamed chunk by chunk of media ids into the best offset + limit."""
        by_viewers = query.metric == pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS
        best = queries.TopKeeper(query.metric, query.offset + query.limit)
        for media, values in self.reader.range_chunks(partitions, query.start, query.end,
                                                      by_viewers):
            best.add(media, values)
        chosen, values, following = best.page(query.offset, query.limit)
        viewers = ({m: values[m][2] for m in chosen} if by_viewers else
                   self.reader.range_viewers_of(partitions, chosen, query.start, query.end))
        media = [pb.TopMedia(media_id=m, rank=query.offset + i + 1, view_time_seconds=values[m][0],
                             starts=values[m][1], unique_viewers=viewers.get(m, 0))
                 for i, m in enumerate(chosen)]
        token = (queries.encode_page_token(query.fingerprint, following, self.page_token_secret)
                 if following is not None else "")
        return pb.ListTopMediaResponse(media=media, next_page_token=token)
