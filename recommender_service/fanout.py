"""Complete answers from an instance that owns only some partitions: ask every owner.

`Fanout` is the asking side. GetSimilarMedia for item i gathers, from the owner of every
partition (this instance's own part read directly), i's neighbour row, the sums of i and of its
neighbours and N over the owner's partitions; neighbours that appear only in other owners'
rows need a second round for their sums in the owners that lacked them. The sums are added and
scored by `partials.score`, exactly as one instance holding every partition would. A
recommendation reads the user's window from the owner of the user's partition, then gathers the
neighbour lists of the window's items the same way (the most-watched fallback gathers every
item's sums). Complete lists are cached (`fanout_cache.ListCache`, both metrics at
`max_limit` per item) under the offsets of every partition they were computed from: each query
first probes every owner's current offsets (one small RPC per other owner, no row read), and
reuses the lists when nothing moved; a RecommendForUser probes once for all its items. Any
owner that fails, is too slow or has not caught up makes the call fail with
`scatter.Incomplete` naming the partitions.

`PartitionServicer` is the answering side: viewevents.v1.RecommenderPartitionService, which
reads only partitions this instance owns and has caught up on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from recommender_service import key_layout as keys
from recommender_service import partials
from recommender_service import similarity as sim
from recommender_service.fanout_cache import ListCache, Lists, Offsets, position_key
from recommender_service.partials import ItemPartials, ItemSums
from recommender_service.query_engine import UnknownItem, UserHistory, window_of
from recommender_service.settings import RecommenderSettings
from recommender_service.similarity import Metric, Ranked
from recommender_service.view import View
from viewevents import scatter
from viewevents.kafka import KeyPartitioner, user_key
from viewevents.rpc.errors import Unparseable, abort_unavailable, reject_unparseable
from viewevents.v1 import recommender_partition_service_pb2 as ppb
from viewevents.v1 import recommender_partition_service_pb2_grpc as ppb_grpc
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

PARTITION_SERVICE = ppb.DESCRIPTOR.services_by_name["RecommenderPartitionService"]
WARM_IDLE_S = 2.0  # as the single instance's warmer (query_engine.IDLE_SECONDS)
Position = view_event_pb2.ConsumerPosition


class Ownership:
    """Who owns which partition and what this instance may read, from the consumer (or, with
    no consumer, everything the view holds)."""

    def __init__(self, source: Callable[[], View], consumer: Any) -> None:
        self.source = source
        self.consumer = consumer
        # The sums of partitions the store holds but this instance no longer owns.
        self.remainder = partials.Remainder()

    @property
    def address(self) -> str:
        return str(getattr(self.consumer, "address", "") or "local")

    def owners(self) -> dict[int, str]:
        owners = getattr(self.consumer, "owners", None)
        if owners is None:
            return {p: self.address for p in self.source().partitions}
        return dict(owners)

    def answerable(self) -> frozenset[int]:
        answerable = getattr(self.consumer, "answerable", None)
        if answerable is None:
            return frozenset(self.source().partitions)
        return frozenset(answerable())

    def check_local(self, partitions: Sequence[int]) -> None:
        missing = sorted(set(partitions) - self.answerable())
        if missing:
            raise scatter.OwnerUnavailable(
                f"instance {self.address} does not own or has not caught up on partitions "
                f"{scatter.format_partitions(missing)}"
            )


def _position(offsets: dict[int, int], watermark: int | None) -> Position:
    position = Position(
        partitions=[
            view_event_pb2.PartitionOffset(partition=p, offset=o)
            for p, o in sorted(offsets.items())
        ],
        caught_up=True,
    )
    if watermark is not None:
        position.event_time_watermark.seconds = watermark
    return position


def to_message(part: ItemPartials) -> ppb.GetItemPartialsResponse:
    return ppb.GetItemPartialsResponse(
        row_media_ids=part.row["j"].tolist(),
        row_dot_products=part.row["d"].tolist(),
        row_co_viewers=part.row["c"].tolist(),
        item_media_ids=part.items.ids.tolist(),
        item_view_time_sums=part.items.s.tolist(),
        item_view_time_squares=part.items.q.tolist(),
        item_viewers=part.items.n.tolist(),
        users=part.users,
        position=_position(part.offsets, part.watermark),
    )


def from_message(reply: ppb.GetItemPartialsResponse) -> tuple[ItemPartials, Position]:
    row = np.zeros(len(reply.row_media_ids), dtype=keys.ROW)
    row["j"] = np.asarray(reply.row_media_ids, dtype=np.int64)
    row["d"] = np.asarray(reply.row_dot_products, dtype=np.int64)
    row["c"] = np.asarray(reply.row_co_viewers, dtype=np.int64)
    items = ItemSums(
        *(
            np.asarray(column, dtype=np.int64)
            for column in (
                reply.item_media_ids,
                reply.item_view_time_sums,
                reply.item_view_time_squares,
                reply.item_viewers,
            )
        )
    )
    return ItemPartials(row, items, reply.users, {}, None), reply.position


@dataclass(frozen=True)
class Gathered:
    """Complete sums for one item query, and the positions of the partials they came from;
    `settled` when a second round read the same offsets as the first (nothing moved between)."""

    row: np.ndarray
    items: ItemSums
    users: int
    positions: list[Position]
    settled: bool = True


class Fanout:
    """The asking side: complete answers gathered from every partition's owner."""

    def __init__(
        self,
        ownership: Ownership,
        settings: RecommenderSettings,
        peers: scatter.Peers | None = None,
        peer_metadata: Sequence[tuple[str, str]] = (),
        timeout: float = scatter.DEFAULT_TIMEOUT_S,
    ) -> None:
        self.ownership = ownership
        self.settings = settings
        self.support = sim.Support(settings.min_co_viewers, settings.shrinkage)
        self.peers = peers or scatter.Peers()
        self.peer_metadata = list(peer_metadata)  # e.g. the bearer token peers expect
        self.timeout = timeout
        self.cache = ListCache(settings.fanout_cache_items)

    def _stub(self, address: str) -> ppb_grpc.RecommenderPartitionServiceStub:
        return ppb_grpc.RecommenderPartitionServiceStub(self.peers.channel(address))

    async def _items(
        self,
        owners: dict[int, str],
        media: int = 0,
        item_ids: dict[str, list[int]] | None = None,
        all_items: bool = False,
    ) -> list[scatter.Partial[tuple[ItemPartials, Position]]]:
        """Every owner's partials (for the partitions `owners` gives it)."""

        async def ask(address: str, parts: list[int]) -> tuple[ItemPartials, Position]:
            extra = (item_ids or {}).get(address, [])
            if address == self.ownership.address:
                self.ownership.check_local(parts)
                view = self.ownership.source()
                if media or extra or all_items:
                    part = await asyncio.to_thread(
                        partials.read,
                        view,
                        parts,
                        media,
                        extra,
                        all_items,
                        self.ownership.remainder,
                    )
                else:  # a position probe: a few point reads, not worth a thread
                    part = partials.read(view, parts)
                return part, _position(part.offsets, part.watermark)
            request = ppb.GetItemPartialsRequest(
                partitions=parts, media_id=media, item_ids=extra, all_items=all_items
            )
            reply = await self._stub(address).GetItemPartials(
                request, metadata=self.peer_metadata, timeout=self.timeout
            )
            return from_message(reply)

        return await scatter.gather(owners, ask, timeout=self.timeout, service="recommender")

    async def gather_item(self, media: int) -> Gathered:
        """Complete sums for `media`: its row, its and its neighbours' sums, N."""
        owners = self.ownership.owners()
        first = await self._items(owners, media)
        row = partials.add_rows([p.result[0].row for p in first])
        neighbours = row["j"].astype(np.int64)
        missing: dict[str, list[int]] = {}
        for partial in first:
            ids = partial.result[0].items.ids
            lacking = neighbours[~np.isin(neighbours, ids)]
            if len(lacking):
                missing[partial.address] = lacking.tolist()
        sums = [p.result[0].items for p in first]
        settled = True
        if missing:  # sums of neighbours seen only in other owners' rows, same owners
            again = {
                p: partial.address
                for partial in first
                if partial.address in missing
                for p in partial.partitions
            }
            second = await self._items(again, 0, missing)
            sums += [p.result[0].items for p in second]
            before = position_key(scatter.merge_positions([p.result[1] for p in first]))
            after = position_key(scatter.merge_positions([p.result[1] for p in second]))
            settled = set(after) <= set(before)
        return Gathered(
            row,
            partials.add_items(sums),
            sum(p.result[0].users for p in first),
            [p.result[1] for p in first],
            settled,
        )

    async def probe(self) -> Offsets:
        """Every partition's offset now, from its owner (which must be caught up on it): one
        small call per other owner, the key of the cached lists."""
        found = await self._items(self.ownership.owners())
        state = position_key(scatter.merge_positions([p.result[1] for p in found]))
        self.cache.observe(state)
        return state

    async def lists(self, media: int, state: Offsets | None = None) -> Lists:
        """Both metrics' top `max_limit` neighbours of `media` over every partition: from the
        cache when `state` (a fresh probe's offsets; probed here when None) is the state they
        were computed from, else gathered, scored and cached."""
        if state is None and self.cache.capacity > 0:
            state = await self.probe()
        if state is not None:
            found = self.cache.get(state, media)
            if found is not None:
                return found
        gathered = await self.gather_item(media)
        if not gathered.items.has(media):
            raise UnknownItem(media)
        computed = Lists(
            {
                metric: partials.score(
                    media,
                    gathered.row,
                    gathered.items,
                    gathered.users,
                    metric,
                    self.support,
                    self.settings.max_limit,
                )
                for metric in Metric
            },
            scatter.merge_positions(gathered.positions),
        )
        if gathered.settled and self.cache.capacity > 0:
            read = position_key(computed.position)
            self.cache.observe(read)
            self.cache.put(read, media, computed)
        return computed

    async def similar(self, media: int, metric: Metric, limit: int) -> tuple[Ranked, Position]:
        found = await self.lists(media)
        return found.lists[metric].head(min(limit, self.settings.max_limit)), found.position

    async def warm(self, state: Offsets, items: Sequence[int]) -> int:
        """Gather and cache the lists of `items` (most watched first) for `state`, the offsets
        a probe just saw; stops as soon as a probe sees newer ones. Returns the lists added."""
        added = 0
        for media in items[: self.cache.capacity]:
            if self.cache.state != state:
                break
            if self.cache.holds(state, media):
                continue
            try:
                await self.lists(media, state)
            except UnknownItem:
                continue
            added += 1
        return added

    async def keep_warm(
        self,
        ready: Callable[[], bool],
        popular: Callable[[], Sequence[int]],
        idle_s: float = WARM_IDLE_S,
        poll_s: float = 0.5,
    ) -> None:
        """While `ready` (caught up, answering by fan-out), once every owner's offsets have
        stood still for `idle_s`, fill the cache with the lists of the `popular` items, as the
        single instance's warmer does for its own lists: queries after a quiet spell then
        probe and read the cache instead of two rounds per item. A new event moves an offset
        and drops the cache anyway, so warming during a stream would be wasted."""
        seen: Offsets | None = None
        since = 0.0
        warmed: Offsets | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(poll_s)
            if self.cache.capacity <= 0 or not ready():
                continue
            try:
                state = await self.probe()
                if state != seen:
                    seen, since = state, loop.time()
                    continue
                if state == warmed or loop.time() - since < idle_s:
                    continue
                began = loop.time()
                added = await self.warm(state, popular())
            except scatter.Incomplete:
                continue  # an owner is away or behind: queries say so; try again later
            except Exception:  # noqa: BLE001 - warming is an optimisation; never kill the service
                log.exception("fan-out cache warming failed")
                continue
            warmed = state
            log.info(
                "fan-out cache warm for %d partitions' offsets: %d lists added in %.1f s",
                len(state),
                added,
                loop.time() - began,
            )

    async def _window(
        self, owners: dict[int, str], parts: list[int], user_id: int
    ) -> list[scatter.Partial[tuple[UserHistory | None, Position]]]:

        async def ask(address: str, asked: list[int]) -> tuple[UserHistory | None, Position]:
            if address == self.ownership.address:
                self.ownership.check_local(asked)
                view = self.ownership.source()
                part = partials.read(view, asked)  # cheap: no row, no items
                return (
                    window_of(view.snapshot, asked, user_id),
                    _position(part.offsets, part.watermark),
                )
            reply = await self._stub(address).GetUserWindow(
                ppb.GetUserWindowRequest(partitions=asked, user_id=user_id),
                metadata=self.peer_metadata,
                timeout=self.timeout,
            )
            if not reply.found:
                return None, reply.position
            return UserHistory(
                list(reply.media_ids),
                list(reply.weights),
                np.asarray(reply.watched_media_ids, dtype=np.int64),
            ), reply.position

        return await scatter.gather(
            owners, ask, timeout=self.timeout, service="recommender", partitions=parts
        )

    async def history(self, user: int) -> tuple[UserHistory | None, list[Position]]:
        """The user's window from the owner of the user's partition (then, as the single
        instance probes, the other partitions: the topic may have had another partition count
        when the user was written)."""
        owners = self.ownership.owners()
        if not owners:
            raise scatter.Incomplete({})
        first = KeyPartitioner(len(owners), memo_size=0)(user_key(user))
        found = await self._window(owners, [first], user)
        positions = [p.result[1] for p in found]
        if found[0].result[0] is not None:
            return found[0].result[0], positions
        others = [p for p in sorted(owners) if p != first]
        if not others:
            return None, positions
        rest = await self._window(owners, others, user)
        positions += [p.result[1] for p in rest]
        hits = sorted((min(p.partitions), p.result[0]) for p in rest if p.result[0] is not None)
        return (hits[0][1] if hits else None), positions

    async def recommend(
        self, user: int, limit: int
    ) -> tuple[np.ndarray, np.ndarray, bool, Position]:
        """(ids, scores, fallback, position) as `QueryEngine.recommend` answers."""
        history, positions = await self.history(user)
        if history is not None and history.media:
            pairs = list(zip(history.media[: self.settings.user_items], history.weights))
            state = await self.probe() if self.cache.capacity > 0 else None

            async def cosine(media: int) -> Lists | None:
                try:
                    return await self.lists(media, state)
                except UnknownItem:
                    return None

            gathered = await asyncio.gather(*(cosine(m) for m, _ in pairs))
            lists: list[Ranked] = []
            weights: list[float] = []
            for (_, weight), found in zip(pairs, gathered):
                if found is None:
                    continue
                positions.append(found.position)
                lists.append(found.lists[Metric.COSINE])
                weights.append(float(weight))
            ids, scores = sim.recommend(lists, weights, history.watched, limit)
            if len(ids):
                return ids, scores, False, scatter.merge_positions(positions)
        watched = history.watched if history is not None else np.zeros(0, dtype=np.int64)
        every = await self._items(self.ownership.owners(), all_items=True)
        items = partials.add_items([p.result[0].items for p in every])
        positions += [p.result[1] for p in every]
        ids, scores = sim.most_watched(
            partials.popularity(items), items.ids, items.n, watched, limit
        )
        return ids, scores, True, scatter.merge_positions(positions)


class PartitionServicer:
    """Implements viewevents.v1.RecommenderPartitionService (internal, instance to instance);
    `RecommenderServicer` serves its methods next to the public ones."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership

    async def _check(self, parts: Sequence[int], context: grpc.aio.ServicerContext) -> Ownership:
        ownership = self.ownership
        if not parts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "partitions are required")
        try:
            ownership.check_local(parts)
        except scatter.OwnerUnavailable as error:
            await abort_unavailable(context, str(error))
        return ownership

    async def GetItemPartials(
        self, request: ppb.GetItemPartialsRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> ppb.GetItemPartialsResponse:
        await reject_unparseable(context, request)
        assert isinstance(request, ppb.GetItemPartialsRequest)
        ownership = await self._check(list(request.partitions), context)
        view = ownership.source()
        if not (request.media_id or request.item_ids or request.all_items):
            return to_message(partials.read(view, list(request.partitions)))  # a position probe
        part = await asyncio.to_thread(
            partials.read,
            view,
            list(request.partitions),
            request.media_id,
            list(request.item_ids),
            request.all_items,
            ownership.remainder,
        )
        return to_message(part)

    async def GetUserWindow(
        self, request: ppb.GetUserWindowRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> ppb.GetUserWindowResponse:
        await reject_unparseable(context, request)
        assert isinstance(request, ppb.GetUserWindowRequest)
        ownership = await self._check(list(request.partitions), context)
        view = ownership.source()
        parts = sorted(request.partitions)
        stamp = partials.read(view, parts)
        found = window_of(view.snapshot, parts, request.user_id)
        position = _position(stamp.offsets, stamp.watermark)
        if found is None:
            return ppb.GetUserWindowResponse(found=False, position=position)
        return ppb.GetUserWindowResponse(
            found=True,
            media_ids=found.media,
            weights=found.weights,
            watched_media_ids=found.watched.tolist(),
            position=position,
        )
