"""Scatter-gather over partition owners: any instance answers any query completely.

State is split by Kafka partition and every aggregate is additive across partitions (the record
key is the user id), so an instance answers a query by asking each partition's owner (itself
included) for its partial answer over exactly those partitions, concurrently and under one
deadline, and lets the service merge the partials. The owners map comes from the consumer
group (`viewevents.membership`). The answer is complete or there is none: a partition with no
known owner, an owner that is unreachable, too slow or not caught up makes the whole query
fail with the partitions named (the service turns that into UNAVAILABLE with RetryInfo).

A call between instances is the public RPC with `x-viewevents-partitions: 0,3` metadata,
meaning "answer from exactly these partitions of your local state; do not fan out". This module
never names a service: the service supplies how to ask one owner and how to merge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from viewevents.metrics import FANOUT_CALLS
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)

PARTITIONS_KEY = "x-viewevents-partitions"  # request: answer from exactly these partitions
ANSWERED_BY_KEY = "x-viewevents-answered-by"  # response: the instance that answered
DEFAULT_TIMEOUT_S = 5.0

T = TypeVar("T")


class OwnerUnavailable(Exception):
    """An owner cannot answer for its partitions now (down, not caught up, moved on)."""


class Incomplete(Exception):
    """Some partitions could not be answered for: the query has no complete answer now."""

    def __init__(self, missing: Mapping[int, str]) -> None:
        self.missing = dict(sorted(missing.items()))
        if not self.missing:
            text = "no partition owner is known yet (the consumer group has not assigned any)"
        else:
            reasons: dict[str, list[int]] = {}
            for partition, reason in self.missing.items():
                reasons.setdefault(reason, []).append(partition)
            text = "; ".join(
                f"partitions {format_partitions(ps)}: {reason}" for reason, ps in reasons.items()
            )
        super().__init__(f"no complete answer now, retry: {text}")


@dataclass(frozen=True)
class Partial(Generic[T]):
    """One owner's answer over the partitions it was asked for."""

    address: str
    partitions: tuple[int, ...]
    result: T


def format_partitions(partitions: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(partitions))


def parse_partitions(text: str) -> list[int]:
    """The partitions of a PARTITIONS_KEY value; ValueError when it is not a list of them."""
    parts = sorted({int(item) for item in text.split(",") if item.strip()})
    if not parts or parts[0] < 0:
        raise ValueError(f"{PARTITIONS_KEY} must list partitions, got {text!r}")
    return parts


def requested_partitions(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[int] | None:
    """The partitions a peer asks for (None: an ordinary client call, to be fanned out)."""
    for key, value in metadata or ():
        if key == PARTITIONS_KEY:
            return parse_partitions(value.decode() if isinstance(value, bytes) else value)
    return None


def by_owner(
    owners: Mapping[int, str], partitions: Iterable[int]
) -> tuple[dict[str, list[int]], list[int]]:
    """The partitions grouped by owner address, and those that have no known owner."""
    grouped: dict[str, list[int]] = {}
    orphans: list[int] = []
    for partition in sorted(set(partitions)):
        address = owners.get(partition)
        if address:
            grouped.setdefault(address, []).append(partition)
        else:
            orphans.append(partition)
    return grouped, orphans


async def gather(
    owners: Mapping[int, str],
    ask: Callable[[str, list[int]], Awaitable[T]],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    service: str = "",
    partitions: Iterable[int] | None = None,
) -> list[Partial[T]]:
    """Ask every owner, concurrently, for its partitions (all of `owners` unless `partitions`
    says which); the partials, or `Incomplete` naming every partition not answered for."""
    wanted = set(owners) if partitions is None else set(partitions)
    if not wanted:
        raise Incomplete({})
    grouped, orphans = by_owner(owners, wanted)
    missing = {p: "no known owner" for p in orphans}
    if missing:
        raise Incomplete(missing)
    addresses = sorted(grouped)
    started = time.monotonic()
    outcomes: list[T | BaseException]
    if len(addresses) == 1:  # one owner (often this instance): no gather task around it
        try:
            outcomes = [await asyncio.wait_for(ask(addresses[0], grouped[addresses[0]]), timeout)]
        except Exception as error:  # noqa: BLE001 - reported like gather's return_exceptions
            outcomes = [error]
    else:
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(ask(a, grouped[a]), timeout) for a in addresses),
            return_exceptions=True,
        )
    partials: list[Partial[T]] = []
    for address, outcome in zip(addresses, outcomes):
        if isinstance(outcome, BaseException):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            reason = _reason(address, outcome, timeout)
            missing.update({p: reason for p in grouped[address]})
            FANOUT_CALLS.labels(service, address, "unavailable").inc()
        else:
            partials.append(Partial(address, tuple(grouped[address]), outcome))
            FANOUT_CALLS.labels(service, address, "ok").inc()
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "asked %s in %.1f ms; missing %s",
            {a: format_partitions(grouped[a]) for a in addresses},
            1000 * (time.monotonic() - started),
            missing or "none",
        )
    if missing:
        raise Incomplete(missing)
    return partials


async def guard_stream(
    address: str,
    partitions: Sequence[int],
    stream: AsyncIterator[T],
    idle_timeout: float | None = None,
) -> AsyncIterator[T]:
    """`stream`'s items; an owner's stream that fails, or stays silent for `idle_timeout`
    seconds between items, raises `Incomplete` naming its partitions (a query streaming
    partials from several owners has no complete answer without every stream)."""
    while True:
        try:
            item = await asyncio.wait_for(anext(stream), idle_timeout)
        except StopAsyncIteration:
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of the owner means "missing"
            reason = _reason(address, error, idle_timeout or 0.0)
            raise Incomplete({p: reason for p in partitions}) from error
        yield item


def _reason(address: str, error: BaseException, timeout: float) -> str:
    if isinstance(error, Incomplete):
        return f"owner {address}: {error}"
    if isinstance(error, TimeoutError):
        return f"owner {address} did not answer within {timeout:.1f} s"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"owner {address}: {error.code().name} {error.details()}"
    if isinstance(error, OwnerUnavailable):
        return f"owner {address}: {error}"
    return f"owner {address}: {error!r}"


def merge_positions(
    positions: Sequence[view_event_pb2.ConsumerPosition],
) -> view_event_pb2.ConsumerPosition:
    """One position for an answer built from partials: every partition each partial read (at
    its offset; a partition several partials read, e.g. a recommendation's neighbour lists
    gathered at different times, at the lowest: the answer holds at least that much of it),
    the highest event-time watermark, caught up when every partial was."""
    offsets: dict[int, int] = {}
    watermarks = []
    for position in positions:
        for p in position.partitions:
            offsets[p.partition] = min(p.offset, offsets.get(p.partition, p.offset))
        if position.HasField("event_time_watermark"):
            watermarks.append(position.event_time_watermark.seconds)
    merged = view_event_pb2.ConsumerPosition(
        partitions=[
            view_event_pb2.PartitionOffset(partition=p, offset=o)
            for p, o in sorted(offsets.items())
        ],
        caught_up=bool(positions) and all(p.caught_up for p in positions),
    )
    if watermarks:
        merged.event_time_watermark.seconds = max(watermarks)
    return merged


ChannelFactory = Callable[[str], grpc.aio.Channel]
# A restarted owner at the same address must be reachable within a retry or two, not after
# gRPC's default reconnect back-off (up to two minutes).
PEER_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def insecure_peer_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS)


def tls_peer_channel(root_certificates: bytes, server_name: str = "") -> ChannelFactory:
    """Channels that verify peers against `root_certificates` (PEM); the peer's certificate
    must be valid for `server_name` when given (replicas reached at addresses no certificate
    can name, such as container ids), else for the host of the address dialled."""
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    options: list[tuple[str, int | str]] = list(PEER_CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return lambda address: grpc.aio.secure_channel(address, credentials, options=options)


class Peers:
    """One long-lived gRPC channel per owner address (created on first use)."""

    def __init__(self, make_channel: ChannelFactory | None = None) -> None:
        self._make = make_channel or insecure_peer_channel
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        found = self._channels.get(address)
        if found is None:
            found = self._channels[address] = self._make(address)
        return found

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace=None)
