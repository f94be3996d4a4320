"""gRPC handlers of viewevents.v1.StatsService: check arguments, gather, answer.

Any instance answers completely: it asks the owner of every partition (itself included) for
its partial answer over those partitions (`viewevents.scatter`) and merges them
(`stats_service.merging`); an instance reads its own RocksDB only for partitions it owns and
has caught up on, never for stale partitions left in its store. When a partition cannot be
answered for, the call fails with UNAVAILABLE and RetryInfo: never a partial answer. A call
carrying `x-viewevents-partitions` comes from another instance and is answered from exactly
those local partitions (UNAVAILABLE when this instance does not own or has not caught up on
one of them).

Every partial carries the consumer position read *before* the state, so the state read is at
least as fresh as the position says. GetMediaStats is a handful of point reads and runs on the
event loop; trends and rankings scan ranges and run in a worker thread so that a long scan
does not hold up the cheap calls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from stats_service import request_parsing
from stats_service.merging import Chunk, merge_buckets, merge_by_media, merge_totals
from stats_service.reader import StatsReader, Totals
from stats_service.request_parsing import Limits, TopQuery, TrendQuery
from stats_service.top_cache import PageCache
from stats_service.top_media import RollupRanker
from viewevents import scatter
from viewevents.consumer import ExactlyOnceConsumer
from viewevents.rpc.errors import abort_bad_request, abort_unavailable, reject_unparseable
from viewevents.v1 import stats_partition_service_pb2 as ppb
from viewevents.v1 import stats_partition_service_pb2_grpc as ppb_grpc
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["StatsService"]
# Internal, between instances; served next to SERVICE behind the same token.
PARTITION_SERVICE = ppb.DESCRIPTOR.services_by_name["StatsPartitionService"]
WARM_POLL_S = 1.0  # how often the rollup warmer checks for a new set of owned partitions
T = TypeVar("T")
Position = view_event_pb2.ConsumerPosition
PartitionOffset = view_event_pb2.PartitionOffset
TrendPart = tuple[dict[int, list[int]], int, bool]  # buckets, unique viewers, media known


def totals_of(stats: pb.MediaStats) -> Totals:
    return Totals(
        view_time=stats.view_time_seconds,
        starts=stats.starts,
        stops=stats.stops,
        ends=stats.ends,
        uniques=stats.unique_viewers,
        first=stats.first_event_time.seconds,
        last=stats.last_event_time.seconds,
    )


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def media_stats(media_id: int, totals: Totals) -> pb.MediaStats:
    return pb.MediaStats(
        media_id=media_id,
        view_time_seconds=totals.view_time,
        starts=totals.starts,
        stops=totals.stops,
        ends=totals.ends,
        unique_viewers=totals.uniques,
        completion_rate=totals.ends / totals.starts if totals.starts else 0.0,
        average_view_time_seconds_per_viewer=(
            totals.view_time / totals.uniques if totals.uniques else 0.0
        ),
        first_event_time=_ts(totals.first),
        last_event_time=_ts(totals.last),
    )


@dataclass
class _Flight:
    """A rollup page being computed, and how many callers wait for it."""

    task: asyncio.Task[bytes]
    waiting: int = 0


class StatsServicer:
    """Implements viewevents.v1.StatsService over a StatsReader and the partition owners."""

    def __init__(
        self,
        reader: StatsReader,
        consumer: ExactlyOnceConsumer | Any,
        limits: Limits,
        page_token_secret: bytes | None = None,
        *,
        peers: scatter.Peers | None = None,
        peer_metadata: Sequence[tuple[str, str]] = (),
        fanout_timeout: float = scatter.DEFAULT_TIMEOUT_S,
        ranker: RollupRanker | None = None,
        pages: PageCache[bytes] | None = None,
    ) -> None:
        self.reader = reader
        self.ranker = ranker  # rankings from the rollups when this instance owns everything
        # Finished pages of those rankings, reused while no offset moved (exact).
        # Kept serialized: the bytes are what they cost (a live message holds about 6 times
        # its serialized size), and every hit hands out a message of its own.
        self.pages: PageCache[bytes] = pages if pages is not None else PageCache(0)
        self.consumer = consumer
        self.limits = limits
        self.page_token_secret = page_token_secret  # None: the process's random secret
        self.peers = peers or scatter.Peers()
        self.peer_metadata = list(peer_metadata)  # e.g. the bearer token peers expect
        self.fanout_timeout = fanout_timeout
        # Scans (trends, rankings) hold memory while they run: a few at a time, others queue.
        self._scans = asyncio.Semaphore(max(1, limits.max_concurrent_scans))
        self._position_kept: tuple[tuple[object, ...], Position] | None = None
        # Rollup pages being computed, by (offsets, request), with how many callers wait for
        # each: identical requests arriving meanwhile (a dashboard shown on many screens) wait
        # for that one computation instead of queueing up copies of it behind the scans limit.
        self._computing: dict[tuple[object, ...], _Flight] = {}
        self._warmer: asyncio.Task[None] | None = None
        self._closed = threading.Event()  # stops a warming thread between two rollup loads

    def memory_bytes(self) -> dict[str, int]:
        """The bytes of this service's own bounded caches (ranking rollups, finished pages), for
        the bootstrap's memory line: without them a growing RSS could not be told from a filling
        cache (the soak, docs/operations.md)."""
        found = {"pages": self.pages.bytes}
        if self.ranker is not None:
            found["rollups"] = self.ranker.cache.bytes
        return found

    # --- who answers for which partition ------------------------------------------------------

    @property
    def address(self) -> str:
        return str(getattr(self.consumer, "address", "") or "local")

    def _owners(self) -> dict[int, str]:
        """partition -> owner address. A consumer outside any group (embedded use: tests,
        benchmarks) owns the partitions of its position."""
        owners = getattr(self.consumer, "owners", None)
        if owners is None:
            return {p.partition: self.address for p in self.consumer.position().partitions}
        return dict(owners)

    def _answerable(self) -> frozenset[int]:
        """Local partitions that may be read: owned and caught up (viewevents.consumer.CatchUp)."""
        answerable = getattr(self.consumer, "answerable", None)
        if answerable is None:
            return frozenset(p.partition for p in self.consumer.position().partitions)
        return frozenset(answerable())

    def _local_position(self, partitions: Sequence[int]) -> Position:
        """The position of `partitions` (read before the state they answer from). The last
        message is kept for the offsets it was built at: its watermark was read after those
        offsets, so it is as fresh as they say (a commit moves the offsets and the watermark
        together); callers copy it into their responses and never change it."""
        wanted = set(partitions)
        offsets = getattr(self.consumer, "positions", None)
        if isinstance(offsets, dict):  # the consumer's own offsets: no message, no state read
            at = tuple((p, offsets[p]) for p in sorted(wanted & offsets.keys()))
            key = (tuple(partitions), at)
            kept = self._position_kept
            if kept is not None and kept[0] == key:
                return kept[1]
            read = [PartitionOffset(partition=p, offset=o) for p, o in at]
            position = self._position_at(read, partitions)
            self._position_kept = (key, position)
            return position
        read = [p for p in self.consumer.position().partitions if p.partition in wanted]
        return self._position_at(read, partitions)

    def _position_at(self, read: list[PartitionOffset], partitions: Sequence[int]) -> Position:
        watermark = self.reader.store.watermark(partitions) if partitions else None
        position = Position(partitions=read, caught_up=True)
        if watermark is not None:
            position.event_time_watermark.seconds = watermark
        return position

    def _all_local(self, context: grpc.aio.ServicerContext) -> list[int] | None:
        """Every partition, when the call comes from a client (not a peer) and this instance
        owns and has caught up on all of them: the query reads its own store directly, without
        the fan-out's machinery (a task, a timeout, metrics per owner), with the same answer."""
        for key, _ in context.invocation_metadata() or ():
            if key == scatter.PARTITIONS_KEY:
                return None
        owners = self._owners()
        address = self.address
        if not owners or any(owner != address for owner in owners.values()):
            return None
        partitions = sorted(owners)
        return partitions if self._answerable().issuperset(partitions) else None

    def _check_local(self, partitions: Sequence[int]) -> None:
        missing = sorted(set(partitions) - self._answerable())
        if missing:
            raise scatter.OwnerUnavailable(
                f"instance {self.address} does not own or has not caught up on partitions "
                f"{scatter.format_partitions(missing)}"
            )

    async def _gather(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        local: Callable[[list[int]], Awaitable[T]],
        remote: Callable[
            [pb_grpc.StatsServiceStub, list[int], Sequence[tuple[str, str]], float], Awaitable[T]
        ],
    ) -> list[T]:
        """Every partition's partial answer: read locally for this instance's partitions, asked
        of their owners for the others; aborts with UNAVAILABLE and RetryInfo when any is
        missing. A call from a peer is answered from exactly the partitions it names."""
        try:
            asked = scatter.requested_partitions(context.invocation_metadata())
        except ValueError as error:
            await abort_bad_request(
                context,
                str(error),
                [request_parsing.violation(scatter.PARTITIONS_KEY, str(error), "INVALID_METADATA")],
            )
        _answered_by(context, self.address)
        if asked is not None:
            try:
                self._check_local(asked)
            except scatter.OwnerUnavailable as error:
                await abort_unavailable(context, str(error))
            log.debug("%s for a peer from partitions %s", method, asked)
            return [await local(asked)]
        remaining = context.time_remaining()
        timeout = (
            self.fanout_timeout
            if remaining is None
            else max(0.05, min(self.fanout_timeout, remaining - 0.05))
        )

        async def ask(address: str, partitions: list[int]) -> T:
            if address == self.address:
                self._check_local(partitions)
                return await local(partitions)
            metadata = [
                (scatter.PARTITIONS_KEY, scatter.format_partitions(partitions)),
                *self.peer_metadata,
            ]
            stub = pb_grpc.StatsServiceStub(self.peers.channel(address))
            return await remote(stub, partitions, metadata, timeout)

        try:
            partials = await scatter.gather(self._owners(), ask, timeout=timeout, service="stats")
        except scatter.Incomplete as incomplete:
            log.info("%s UNAVAILABLE: %s", method, incomplete)
            await abort_unavailable(context, str(incomplete))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s answered by %s from %s",
                method,
                self.address,
                {p.address: scatter.format_partitions(p.partitions) for p in partials},
            )
        return [p.result for p in partials]

    async def _not_found(
        self, context: grpc.aio.ServicerContext, media_id: int, position: Position
    ) -> None:
        offsets = ", ".join(f"{p.partition}:{p.offset}" for p in position.partitions)
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"media item {media_id} has no events (consumer at offsets [{offsets}], "
            f"caught_up={position.caught_up})",
        )

    # --- GetMediaStats ----------------------------------------------------------------------

    async def GetMediaStats(
        self, request: pb.GetMediaStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMediaStatsResponse:
        await reject_unparseable(context, request)
        violations: list[view_event_pb2.FieldViolation] = []
        request_parsing.check_media_id(request.media_id, violations)
        if violations:
            await abort_bad_request(context, "invalid GetMediaStats request", violations)

        every = self._all_local(context)
        if every is not None:
            _answered_by(context, self.address)
            position = self._local_position(every)
            found = self.reader.totals(every, request.media_id)
            if found is None:
                await self._not_found(context, request.media_id, position)
            assert found is not None
            return pb.GetMediaStatsResponse(
                stats=media_stats(request.media_id, found), position=position
            )

        async def local(partitions: list[int]) -> tuple[Totals | None, Position]:
            position = self._local_position(partitions)
            return self.reader.totals(partitions, request.media_id), position

        async def remote(
            stub: pb_grpc.StatsServiceStub,
            partitions: list[int],
            metadata: Sequence[tuple[str, str]],
            timeout: float,
        ) -> tuple[Totals | None, Position]:
            reply = await stub.GetMediaStats(request, metadata=metadata, timeout=timeout)
            return (totals_of(reply.stats) if reply.HasField("stats") else None), reply.position

        parts = await self._gather(context, "GetMediaStats", local, remote)
        position = scatter.merge_positions([p for _, p in parts])
        totals = merge_totals(t for t, _ in parts)
        if scatter.requested_partitions(context.invocation_metadata()) is not None:
            # A peer's partial: no stats field when these partitions have no events for it.
            return pb.GetMediaStatsResponse(
                stats=media_stats(request.media_id, totals) if totals else None, position=position
            )
        if totals is None:
            await self._not_found(context, request.media_id, position)
        assert totals is not None
        return pb.GetMediaStatsResponse(
            stats=media_stats(request.media_id, totals), position=position
        )

    # --- GetMediaTrend ----------------------------------------------------------------------

    async def GetMediaTrend(
        self, request: pb.GetMediaTrendRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMediaTrendResponse:
        await reject_unparseable(context, request)
        query, violations = request_parsing.parse_trend(request, self.limits)
        if query is None:
            await abort_bad_request(context, "invalid GetMediaTrend request", violations)
        assert query is not None
        trend: TrendQuery = query  # narrowed, for the closures below

        async def local(partitions: list[int]) -> tuple[TrendPart, Position]:
            position = self._local_position(partitions)
            if self.reader.totals(partitions, trend.media_id) is None:
                return ({}, 0, False), position
            cached = self._rollup_partitions(trend.start, trend.end) == sorted(partitions)
            async with self._scans:
                part = await asyncio.to_thread(self._trend_part, trend, partitions, cached)
            return part, position

        async def remote(
            stub: pb_grpc.StatsServiceStub,
            partitions: list[int],
            metadata: Sequence[tuple[str, str]],
            timeout: float,
        ) -> tuple[TrendPart, Position]:
            reply = await stub.GetMediaTrend(request, metadata=metadata, timeout=timeout)
            buckets = {
                b.start_time.seconds: [
                    b.view_time_seconds,
                    b.starts,
                    b.stops,
                    b.ends,
                    b.unique_viewers,
                ]
                for b in reply.buckets
            }
            # A peer says media_id 0 when its partitions have no events for the item.
            return (buckets, reply.unique_viewers, reply.media_id != 0), reply.position

        parts = await self._gather(context, "GetMediaTrend", local, remote)
        position = scatter.merge_positions([p for _, p in parts])
        known = any(part[2] for part, _ in parts)
        peer = scatter.requested_partitions(context.invocation_metadata()) is not None
        if not known and not peer:
            await self._not_found(context, query.media_id, position)
        buckets = merge_buckets(part[0] for part, _ in parts)
        viewers = sum(part[1] for part, _ in parts)  # a user lives in one partition
        if peer:
            query = TrendQuery(query.media_id, query.size, query.start, query.end, False)
        response = self._trend_response(query, buckets, viewers)
        if peer and not known:
            response.media_id = 0
        response.position.CopyFrom(position)
        return response

    def _trend_part(
        self, query: TrendQuery, partitions: Sequence[int], cached: bool
    ) -> tuple[dict[int, list[int]], int, bool]:
        """The item's buckets, and its distinct viewers over the range: with `cached`, from
        the rollup cache's entries for the item (kept per partition and day, and refreshed
        from the changed pairs: a dashboard asks about the same items again and again, and
        under a live stream re-reading a popular item's viewer rows of the range's edge days
        on every call cost about half as much as the rankings), else read afresh."""
        media, start, end = query.media_id, query.start, query.end
        found = self.reader.trend(partitions, media, query.size, start, end)
        if cached:
            assert self.ranker is not None
            item = np.array([media], np.int64)
            viewers = int(
                self.ranker.page_viewers(partitions, item, start, end, load_days=False)[0]
            )
        else:
            viewers = self.reader.viewers(partitions, media, start, end)
        return found, viewers, True

    @staticmethod
    def _trend_response(
        query: TrendQuery, found: dict[int, list[int]], viewers: int
    ) -> pb.GetMediaTrendResponse:
        starts = (
            request_parsing.empty_bucket_starts(query.start, query.end, query.size)
            if query.include_empty
            else sorted(found)
        )
        buckets = []
        for start in starts:
            row = found.get(start, (0, 0, 0, 0, 0))
            buckets.append(
                pb.TrendBucket(
                    start_time=_ts(start),
                    view_time_seconds=row[0],
                    starts=row[1],
                    stops=row[2],
                    ends=row[3],
                    unique_viewers=row[4],
                )
            )
        granularity = {v: g for g, v in request_parsing.GRANULARITY_SECONDS.items()}[query.size]
        return pb.GetMediaTrendResponse(
            media_id=query.media_id,
            granularity=granularity,
            buckets=buckets,
            unique_viewers=viewers,
        )

    # --- ListTopMedia -----------------------------------------------------------------------

    async def ListTopMedia(
        self, request: pb.ListTopMediaRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTopMediaResponse:
        """Exact over every partition whichever instance answers: each owner streams its
        per-media partial sums of the range in media id order (StreamMediaPartials; this
        instance reads its own partitions directly), the streams are merged by media id into a
        running top-(offset + limit). Per-owner top lists would not do: an item can be below
        every owner's k and above the global k. Any owner missing: UNAVAILABLE, no ranking."""
        await reject_unparseable(context, request)
        query, violations = request_parsing.parse_top(request, self.limits, self.page_token_secret)
        if query is None:
            await abort_bad_request(context, "invalid ListTopMedia request", violations)
        assert query is not None
        _answered_by(context, self.address)
        try:
            return await self._top(query, context.time_remaining())
        except scatter.Incomplete as incomplete:
            log.info("ListTopMedia UNAVAILABLE: %s", incomplete)
            await abort_unavailable(context, str(incomplete))

    def _rollup_partitions(self, start: int, end: int) -> list[int] | None:
        """All partitions, when this instance owns and has caught up on every one of them and
        the range is short enough for the rollups; None: use the streaming path (on the event
        loop, where the ownership changes)."""
        if self.ranker is None or not self.ranker.covers(start, end):
            return None
        return self._every_partition_local() or None

    def _every_partition_local(self) -> list[int]:
        """Every partition, when this instance owns and has caught up on all of them (rankings
        then come from its rollups); else none."""
        owners = self._owners()
        if not owners or set(owners.values()) != {self.address}:
            return []
        partitions = sorted(owners)
        return partitions if set(partitions) <= self._answerable() else []

    # --- rollup warming ---------------------------------------------------------------------

    def start_rollup_warmer(self) -> None:
        """Load the ranking rollups, newest day first, whenever this instance comes to answer
        rankings from its rollups (caught up on every partition): after a start, a restart or
        a rebalance the first rankings then read the cache instead of each loading about a
        hundred rollups (measured: docs/stats-service.md). On the running event loop."""
        if self.ranker is not None:
            self._warmer = asyncio.get_running_loop().create_task(
                self._keep_rollups_warm(self.ranker), name="rollup-warmer"
            )

    def close(self) -> None:
        """Called by the bootstrap on shutdown, before RocksDB closes: stops the rollup warmer
        (a warming thread stops at its next rollup load)."""
        self._closed.set()
        if self._warmer is not None:
            self._warmer.cancel()

    async def _keep_rollups_warm(self, ranker: RollupRanker) -> None:
        warmed: list[int] = []
        while True:
            await asyncio.sleep(WARM_POLL_S)
            partitions = self._every_partition_local()
            if not partitions or partitions == warmed:
                continue
            try:
                if await self._warm_rollups(ranker, partitions):
                    warmed = partitions
            except Exception:  # noqa: BLE001 - warming is an optimisation; never kill the service
                log.exception("rollup warming failed")

    async def _warm_rollups(self, ranker: RollupRanker, partitions: list[int]) -> bool:
        """One pass, a day at a time under the scans limit (a ranking waits at most for one
        day's rollups); False when the partitions changed meanwhile (warm again later)."""
        began, loads = time.monotonic(), ranker.cache.loads
        days = await asyncio.to_thread(ranker.days_with_data, partitions)
        warmed = {False: 0, True: 0}  # days warmed: bucket rollups, viewer rollups
        for viewers in (False, True):
            for day in days:
                async with self._scans:
                    if self._every_partition_local() != partitions:
                        return False
                    room = await asyncio.to_thread(
                        ranker.warm_day, partitions, day, viewers, self._closed.is_set
                    )
                if self._closed.is_set():
                    return False
                if not room:
                    break
                warmed[viewers] += 1
        log.info(
            "rollups warm for partitions %s: buckets of %d and viewers of %d of %d days, "
            "%d rollups loaded in %.1f s, cache %.1f of %.1f MiB",
            ",".join(map(str, partitions)),
            warmed[False],
            warmed[True],
            len(days),
            ranker.cache.loads - loads,
            time.monotonic() - began,
            ranker.cache.bytes / 2**20,
            ranker.cache.budget / 2**20,
        )
        return True

    async def _top_from_rollups(
        self, query: TopQuery, partitions: list[int]
    ) -> pb.ListTopMediaResponse:
        """One page from the in-memory rollups (exact, see stats_service.top_media)."""
        position = self._local_position(partitions)  # before the state: names what is read
        offsets = tuple((p.partition, p.offset) for p in position.partitions)
        request = (
            query.fingerprint,
            query.start,
            query.end,
            query.metric,
            query.offset,
            query.limit,
        )
        kept = self.pages.get(offsets, request)
        if kept is not None:
            return pb.ListTopMediaResponse.FromString(kept)
        key = (offsets, request)
        flight = self._computing.get(key)
        if flight is None:
            task = asyncio.ensure_future(
                self._rollup_page(query, partitions, position, offsets, request)
            )
            flight = self._computing[key] = _Flight(task)
            task.add_done_callback(partial(self._computed, key))
        flight.waiting += 1
        try:
            # Shielded: a caller that gives up (deadline, cancel) leaves the page to the others.
            return pb.ListTopMediaResponse.FromString(await asyncio.shield(flight.task))
        finally:
            flight.waiting -= 1
            if not flight.waiting and not flight.task.done():
                flight.task.cancel()  # nobody waits for it any more: no dead work queued
                if self._computing.get(key) is flight:
                    del self._computing[key]  # a later caller starts afresh

    def _computed(self, key: tuple[object, ...], task: asyncio.Task[bytes]) -> None:
        flight = self._computing.get(key)
        if flight is not None and flight.task is task:
            del self._computing[key]
        if not task.cancelled():
            task.exception()  # retrieved: not reported as lost when every caller gave up

    async def _rollup_page(
        self,
        query: TopQuery,
        partitions: list[int],
        position: Position,
        offsets: tuple[tuple[int, int], ...],
        request: tuple[object, ...],
    ) -> bytes:
        """The page computed from the rollups, serialized, and kept for these offsets."""
        assert self.ranker is not None
        ranker = self.ranker
        column = request_parsing.METRIC_COLUMN[query.metric]

        def compute() -> tuple[list[int], np.ndarray, bool]:
            ranking = ranker.top(
                partitions, query.start, query.end, column, query.offset + query.limit
            )
            chosen = ranking.media[query.offset :]
            values = ranking.values[query.offset :]
            if (
                column != request_parsing.METRIC_COLUMN[pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS]
                and chosen
            ):
                order = np.argsort(chosen)
                ids = np.asarray(chosen, np.int64)[order]
                values[order, 2] = ranker.page_viewers(partitions, ids, query.start, query.end)
            return chosen, values, ranking.more

        async with self._scans:
            chosen, values, more = await asyncio.to_thread(compute)
        following = query.offset + query.limit
        token = (
            request_parsing.encode_page_token(query.fingerprint, following, self.page_token_secret)
            if more
            else ""
        )
        media = [
            pb.TopMedia(
                media_id=m,
                rank=query.offset + i + 1,
                view_time_seconds=int(row[0]),
                starts=int(row[1]),
                unique_viewers=int(row[2]),
            )
            for i, (m, row) in enumerate(zip(chosen, values.tolist()))
        ]
        page = pb.ListTopMediaResponse(media=media, next_page_token=token, position=position)
        serialized = page.SerializeToString()
        self.pages.put(offsets, request, serialized, len(serialized))
        return serialized

    async def _top(self, query: TopQuery, deadline: float | None) -> pb.ListTopMediaResponse:
        """One page of the ranking over every partition, or `scatter.Incomplete`."""
        local = self._rollup_partitions(query.start, query.end)
        if local is not None:
            return await self._top_from_rollups(query, local)
        by_viewers = query.metric == pb.TOP_MEDIA_METRIC_UNIQUE_VIEWERS
        calls: list[grpc.aio.Call] = []
        try:
            opened = await scatter.gather(
                self._owners(),
                lambda address, partitions: self._open_partials(
                    address, partitions, query.start, query.end, by_viewers, deadline, calls
                ),
                timeout=self._step_timeout(deadline),
                service="stats",
            )
            best = request_parsing.TopKeeper(query.metric, query.offset + query.limit)
            await self._rank(best, [p.result[1] for p in opened])
            chosen, values, following = best.page(query.offset, query.limit)
            viewers = (
                {m: values[m][2] for m in chosen}
                if by_viewers or not chosen
                else await self._page_viewers(chosen, query.start, query.end, deadline, calls)
            )
        finally:
            for call in calls:
                call.cancel()
        media = [
            pb.TopMedia(
                media_id=m,
                rank=query.offset + i + 1,
                view_time_seconds=values[m][0],
                starts=values[m][1],
                unique_viewers=viewers.get(m, 0),
            )
            for i, m in enumerate(chosen)
        ]
        token = (
            request_parsing.encode_page_token(query.fingerprint, following, self.page_token_secret)
            if following is not None
            else ""
        )
        return pb.ListTopMediaResponse(
            media=media,
            next_page_token=token,
            position=scatter.merge_positions([p.result[0] for p in opened]),
        )

    async def _rank(
        self, best: request_parsing.TopKeeper, streams: Sequence[AsyncIterator[Chunk]]
    ) -> None:
        """Feed the merged streams to `best`, about `chunk_rows` media at a time (the keeper
        re-sorts its rows on every add)."""
        batch: list[Chunk] = []
        held = 0
        async for media, values in merge_by_media(streams):
            batch.append((media, values))
            held += len(media)
            if held >= self.reader.chunk_rows:
                best.add(
                    np.concatenate([m for m, _ in batch]), np.concatenate([v for _, v in batch])
                )
                batch, held = [], 0
        if batch:
            best.add(np.concatenate([m for m, _ in batch]), np.concatenate([v for _, v in batch]))

    def _step_timeout(self, deadline: float | None) -> float:
        """How long one owner may take to start answering, or between two batches."""
        return (
            self.fanout_timeout
            if deadline is None
            else max(0.05, min(self.fanout_timeout, deadline - 0.05))
        )

    async def _open_partials(
        self,
        address: str,
        partitions: list[int],
        start: int,
        end: int,
        viewers: bool,
        deadline: float | None,
        calls: list[grpc.aio.Call],
    ) -> tuple[Position, AsyncIterator[Chunk]]:
        """One owner's position and its stream of partial sums (guarded: a failure names its
        partitions). This instance's partitions are read directly, others' asked for."""
        if address == self.address:
            self._check_local(partitions)
            position = self._local_position(partitions)
            return position, self._local_chunks(partitions, start, end, viewers)
        call = self._partials_call(address, partitions, start, end, viewers, (), deadline)
        calls.append(call)
        first = await call.read()
        if first is grpc.aio.EOF:
            raise scatter.OwnerUnavailable("the stream ended without a position")
        position = Position()
        position.CopyFrom(first.position)

        async def chunks() -> AsyncIterator[Chunk]:
            reply = first
            while reply is not grpc.aio.EOF:
                if reply.media_ids:
                    yield chunk_of(reply)
                reply = await call.read()

        return position, scatter.guard_stream(
            address, partitions, chunks(), self._step_timeout(deadline)
        )

    def _partials_call(
        self,
        address: str,
        partitions: Sequence[int],
        start: int,
        end: int,
        viewers: bool,
        media_ids: Sequence[int],
        deadline: float | None,
    ) -> Any:
        request = ppb.StreamMediaPartialsRequest(
            start_time=_ts(start),
            end_time=_ts(end),
            partitions=partitions,
            include_unique_viewers=viewers,
            media_ids=media_ids,
        )
        stub = ppb_grpc.StatsPartitionServiceStub(self.peers.channel(address))
        return stub.StreamMediaPartials(
            request,
            metadata=self.peer_metadata,
            timeout=None if deadline is None else max(0.05, deadline),
        )

    async def _local_chunks(
        self, partitions: Sequence[int], start: int, end: int, viewers: bool
    ) -> AsyncIterator[Chunk]:
        """This instance's partial sums, one reader chunk at a time in a worker thread; a scan
        slot is held per chunk, not per stream, so that instances streaming to each other
        never wait on each other's slots."""
        chunks = self.reader.range_chunks(partitions, start, end, viewers)
        try:
            while True:
                async with self._scans:
                    chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            try:
                getattr(chunks, "close", lambda: None)()  # a generator: release its scans
            except ValueError:  # cancelled while a worker thread still runs it: it ends there
                pass

    async def _page_viewers(
        self,
        chosen: list[int],
        start: int,
        end: int,
        deadline: float | None,
        calls: list[grpc.aio.Call],
    ) -> dict[int, int]:
        """Distinct viewers of the page's items over every partition (they add: a user lives
        in one partition), when the ranking was by another metric."""
        ids = sorted(chosen)

        async def ask(address: str, partitions: list[int]) -> dict[int, int]:
            if address == self.address:
                self._check_local(partitions)
                async with self._scans:
                    return await asyncio.to_thread(
                        self.reader.range_viewers_of, partitions, ids, start, end
                    )
            call = self._partials_call(address, partitions, start, end, True, ids, deadline)
            calls.append(call)
            found: dict[int, int] = {}
            async for reply in call:
                found.update(zip(reply.media_ids, reply.unique_viewers))
            return found

        parts = await scatter.gather(
            self._owners(),
            ask,
            timeout=(self.fanout_timeout if deadline is None else max(0.05, deadline - 0.05)),
            service="stats",
        )
        return {m: sum(p.result.get(m, 0) for p in parts) for m in ids}

    # --- StatsPartitionService (internal, between instances) ------------------------------------

    async def StreamMediaPartials(
        self, request: ppb.StreamMediaPartialsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ppb.StreamMediaPartialsResponse]:
        """Partial sums from exactly the named local partitions, in batches of PARTIAL_BATCH
        media; the position (read before the state) on the first batch. Memory: one reader
        chunk; gRPC flow control holds the reading back when the asker is slower."""
        await reject_unparseable(context, request)
        violations = request_parsing.check_partials(request)
        if violations:
            await abort_bad_request(context, "invalid StreamMediaPartials request", violations)
        _answered_by(context, self.address)
        partitions = sorted(set(request.partitions))
        try:
            self._check_local(partitions)
        except scatter.OwnerUnavailable as error:
            await abort_unavailable(context, str(error))
        position = self._local_position(partitions)
        start, end = request.start_time.seconds, request.end_time.seconds
        if request.media_ids:
            ids = sorted(set(request.media_ids))
            async with self._scans:
                found = await asyncio.to_thread(
                    self.reader.range_viewers_of, partitions, ids, start, end
                )
            yield ppb.StreamMediaPartialsResponse(
                media_ids=ids, unique_viewers=[found[m] for m in ids], position=position
            )
            return
        sent = False
        async for media, values in self._local_chunks(
            partitions, start, end, request.include_unique_viewers
        ):
            for reply in partial_batches(media, values, PARTIAL_BATCH):
                if not sent:
                    reply.position.CopyFrom(position)
                    sent = True
                yield reply
        if not sent:
            yield ppb.StreamMediaPartialsResponse(position=position)


PARTIAL_BATCH = 1_000  # media per StreamMediaPartials message: small per-message overhead


def partial_batches(
    media: np.ndarray, values: np.ndarray, size: int
) -> Iterator[ppb.StreamMediaPartialsResponse]:
    """A chunk of partial sums as messages of at most `size` media each."""
    for at in range(0, len(media), size):
        rows = values[at : at + size]
        yield ppb.StreamMediaPartialsResponse(
            media_ids=media[at : at + size].tolist(),
            view_time_seconds=rows[:, 0].tolist(),
            starts=rows[:, 1].tolist(),
            unique_viewers=rows[:, 2].tolist(),
        )


def chunk_of(reply: ppb.StreamMediaPartialsResponse) -> Chunk:
    """A message's partial sums as a merge chunk (ascending ids, rows of three columns)."""
    media = np.asarray(reply.media_ids, np.int64)
    values = np.zeros((len(media), 3), np.int64)
    values[:, 0] = reply.view_time_seconds
    values[:, 1] = reply.starts
    values[:, 2] = reply.unique_viewers
    return media, values


def _answered_by(context: grpc.aio.ServicerContext, address: str) -> None:
    """Tell the caller which instance answered, for operators and tests. A trailer, not a
    header: sending initial metadata is a write of its own (about half of a GetMediaStats
    call's server time), while trailers go out with the status."""
    try:
        context.set_trailing_metadata(((scatter.ANSWERED_BY_KEY, address),))
    except Exception:  # noqa: BLE001 - a test's bare context
        pass
