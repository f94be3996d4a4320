"""gRPC handlers of the ingest service: validate, write to Kafka, answer once acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import cast

import grpc
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from google.protobuf import timestamp_pb2

from ingest_service.admission import LagAdmission
from ingest_service.planning import from_messages, plan
from ingest_service.producers import Producers
from ingest_service.raw_requests import ScannedRequest, scan_upload_request
from ingest_service.validation import Limits, abbreviate, dead_letter_copy
from ingest_service.writer import PartitionedWriter
from viewevents.config import Config
from viewevents.kafka import REJECTED_EVENT_HEADERS, VIEW_EVENT_HEADERS, KeyPartitioner, user_key
from viewevents.metrics import EVENTS_ACCEPTED, EVENTS_RECEIVED, EVENTS_REJECTED
from viewevents.rpc.errors import (
    Unparseable,
    abort_bad_request,
    lenient_parser,
    reject_unparseable,
)
from viewevents.v1 import ingest_service_pb2 as pb
from viewevents.v1 import view_event_pb2

log = logging.getLogger(__name__)
CANCEL_GRACE_SECONDS = 0.01
UploadLike = ScannedRequest | pb.UploadRequest | pb.PublishRequest
_parse_upload = lenient_parser(pb.UploadRequest)


@dataclass
class _Tally:
    """Counts of one RPC (or one request of UploadStream)."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    rejections: list[pb.Rejection] = field(default_factory=list)


@dataclass
class _Writes:
    """The two writers of one RPC: accepted events and dead letters."""

    accepted: PartitionedWriter
    dead_letters: PartitionedWriter

    async def flush(self, tally: _Tally) -> None:
        """Until Kafka acknowledged everything written so far."""
        await self.accepted.flush()
        await self.dead_letters.flush()
        EVENTS_ACCEPTED.inc(tally.accepted)

    def abandon(self) -> None:
        self.accepted.abandon()
        self.dead_letters.abandon()


LIMIT_READ_TIMEOUT_S = 5.0  # a refused RPC waits at most this long for the topics' new limit


class IngestServicer:
    """Implements viewevents.v1.IngestService.

    A streaming RPC commits only by answering: whatever ends it earlier (cancel, deadline, idle
    timeout, invalid request, Kafka failure) abandons it the same way: no more batches are
    shipped, none is waited for, and no summary is given (see IngestService in the proto).
    """

    # Handed the request bytes, not a parsed message (viewevents.rpc.server.add_service), so
    # that an upload's events are read without a protobuf message each (raw_requests).
    RAW_REQUEST_METHODS = frozenset({"Upload", "UploadStream"})

    def __init__(
        self,
        config: Config,
        producers: Producers,
        partitions: dict[str, int],
        max_record_bytes: int,
        read_record_limit: Callable[[], Awaitable[int | None]] | None = None,
        admission: LagAdmission | None = None,
    ) -> None:
        self._config = config
        self._admission = admission
        self._read_record_limit = read_record_limit
        self._producers = producers
        self._limits = Limits(
            max_future_skew_seconds=config.max_future_skew_seconds,
            max_event_age_seconds=config.max_event_age_days * 86400,
            max_event_id_bytes=config.max_event_id_bytes,
            max_record_bytes=max_record_bytes,
        )
        self._partitioners = {topic: KeyPartitioner(n) for topic, n in partitions.items()}

    @property
    def max_record_bytes(self) -> int:
        return self._limits.max_record_bytes

    async def refresh_record_limit(self) -> None:
        """Re-read the largest record the topics take: an operator may lower a topic's
        max.message.bytes while ingest runs, and an event over the new limit must then be
        rejected TOO_LARGE rather than fail its batch (and the RPC) at the broker."""
        if self._read_record_limit is None:
            return
        limit = await self._read_record_limit()
        if limit is not None and limit != self._limits.max_record_bytes:
            log.warning(
                "records up to %d bytes from now on (was %d): the topics' max.message.bytes "
                "changed",
                limit,
                self._limits.max_record_bytes,
            )
            self._limits = replace(self._limits, max_record_bytes=limit)

    @contextlib.asynccontextmanager
    async def _writing(self, context: grpc.aio.ServicerContext) -> AsyncIterator[_Writes]:
        """This RPC's writers; if Kafka fails the RPC ends UNAVAILABLE (and never claims what
        was not stored), and a producer that failed for good is replaced; on any failure
        pending batches are let go."""
        c = self._config
        timeout = c.producer_timeout_ms / 1000
        producer = self._producers.current
        writes = _Writes(
            PartitionedWriter(
                producer,
                c.view_topic,
                self._partitioners[c.view_topic],
                VIEW_EVENT_HEADERS,
                c.max_inflight_batches,
                timeout,
            ),
            PartitionedWriter(
                producer,
                c.dead_letter_topic,
                self._partitioners[c.dead_letter_topic],
                REJECTED_EVENT_HEADERS,
                c.max_inflight_batches,
                timeout,
            ),
        )
        try:
            yield writes
        except KafkaError as error:
            writes.abandon()
            if not isinstance(error, KafkaTimeoutError):  # a broken producer, not a slow Kafka
                with contextlib.suppress(Exception):
                    await self._producers.replace(producer, error)
            if isinstance(error, MessageSizeTooLargeError):  # the topic's limit was lowered?
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.refresh_record_limit(), LIMIT_READ_TIMEOUT_S)
            await self._unavailable(context, error)
        except BaseException:
            writes.abandon()
            raise

    async def _requests(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UploadRequest]:
        """The client's requests; a stream idle too long ends DEADLINE_EXCEEDED, and one the
        client cancelled (or whose deadline passed) raises CancelledError instead of looking
        like a complete upload (grpc ends the iterator quietly in that case)."""
        idle = self._config.upload_idle_timeout_seconds
        iterator = aiter(request_iterator)
        while True:
            try:
                request = await asyncio.wait_for(anext(iterator), idle)
            except StopAsyncIteration:
                break
            except TimeoutError:
                log.info("closing an upload stream idle for %g s", idle)
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no request for {idle:g} s (VIEWEVENTS_UPLOAD_IDLE_TIMEOUT_SECONDS): the "
                    "stream is closed without a summary; events not acknowledged may or may not "
                    "be stored, so re-send them (consumers drop duplicate event ids)",
                )
            yield request
        # A client's cancel also ends the iterator; grpc cancels this task a moment later (when
        # its poller next runs). Give it that moment, so a cancelled upload is not committed.
        await asyncio.sleep(CANCEL_GRACE_SECONDS)
        if context.cancelled() or context.done():
            raise asyncio.CancelledError("the client cancelled the upload or its deadline passed")

    async def _ingest(
        self,
        request: UploadLike,
        first_index: int,
        tally: _Tally,
        writes: _Writes,
        source: str,
        max_reported: int,
    ) -> None:
        """Validate a request's events, append valid ones to the view topic and the rest to the
        DLQ.

        The common case (every event valid) costs a few array passes and C-level maps per
        request; only events the vectorized pre-check cannot vouch for are validated one by one.
        """
        now = time.time()
        limits = self._limits
        if isinstance(request, ScannedRequest):
            events = request.events(now, limits)
        else:
            events = from_messages(request.events, now, limits)
        decided = plan(events, now, limits)
        if self._admission is not None:
            await self._admission.admit()
        await writes.accepted.append_many(decided.keys, decided.values)
        tally.accepted += len(decided.keys)
        for offset in sorted(decided.problems):
            event = events.message(offset)
            violations = decided.problems[offset]
            tally.rejected += 1
            for violation in violations:
                EVENTS_REJECTED.labels(violation.field, violation.reason).inc()
            if len(tally.rejections) < max_reported:
                tally.rejections.append(
                    pb.Rejection(
                        index=first_index + offset,
                        event_id=abbreviate(event.event_id),
                        field_violations=violations,
                    )
                )
            rejected = view_event_pb2.RejectedEvent(
                event=dead_letter_copy(event, limits),
                field_violations=violations,
                source=source,
                reject_time=timestamp_pb2.Timestamp(seconds=int(now)),
            )
            key = (
                user_key(event.user_id)
                if event.user_id > 0
                else abbreviate(event.event_id).encode("utf-8", "surrogatepass")
            )
            await writes.dead_letters.append(key, rejected.SerializeToString())
        tally.received += len(events)
        EVENTS_RECEIVED.inc(len(events))

    @staticmethod
    def _read(request: bytes | pb.UploadRequest | Unparseable) -> UploadLike | Unparseable:
        """An Upload/UploadStream request as received (raw bytes, see RAW_REQUEST_METHODS):
        scanned without a message per event when in the plain form, else parsed by protobuf."""
        if not isinstance(request, bytes):
            return request  # already parsed (a test calling the handler directly)
        scanned = scan_upload_request(request)
        if scanned is not None:
            return scanned
        return cast(pb.UploadRequest | Unparseable, _parse_upload(request))

    async def _check_request(
        self, context: grpc.aio.ServicerContext, request: object, number: int
    ) -> None:
        await reject_unparseable(context, request)
        count = _count(request)
        limit = self._config.max_events_per_request
        if count > limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request {number} has {count} events; at most {limit} per request are accepted "
                f"(VIEWEVENTS_MAX_EVENTS_PER_REQUEST): split it into smaller batches",
            )

    async def _unavailable(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        log.error("Kafka write failed: %r", error)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"Kafka did not acknowledge the events ({type(error).__name__}: {error}); "
            "no summary was produced, so retry the upload (consumers drop duplicate event ids)",
        )

    async def Upload(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadSummary:
        tally = _Tally()
        requests = 0
        started = time.monotonic()
        async with self._writing(context) as writes:
            async for received in self._requests(request_iterator, context):
                request = self._read(received)
                await self._check_request(context, request, requests)
                assert not isinstance(request, Unparseable)
                await self._ingest(
                    request,
                    tally.received,
                    tally,
                    writes,
                    "Upload",
                    self._config.max_rejections_reported,
                )
                requests += 1
            await writes.flush(tally)
        elapsed = time.monotonic() - started
        log.info(
            "Upload: %d events in %d requests, %d accepted, %d rejected, %.1f s (%.0f events/s)",
            tally.received,
            requests,
            tally.accepted,
            tally.rejected,
            elapsed,
            tally.received / elapsed if elapsed else 0.0,
        )
        return pb.UploadSummary(
            received=tally.received,
            accepted=tally.accepted,
            rejected=tally.rejected,
            rejections=tally.rejections,
            requests=requests,
            positions=_positions(writes.accepted),
        )

    async def UploadStream(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.UploadAck]:
        request_index = 0
        async with self._writing(context) as writes:
            async for received in self._requests(request_iterator, context):
                request = self._read(received)
                await self._check_request(context, request, request_index)
                assert not isinstance(request, Unparseable)
                tally = _Tally()
                await self._ingest(request, 0, tally, writes, "UploadStream", _count(request))
                await writes.flush(tally)
                yield pb.UploadAck(
                    sequence=request.sequence,
                    request_index=request_index,
                    received=tally.received,
                    accepted=tally.accepted,
                    rejected=tally.rejected,
                    rejections=tally.rejections,
                    positions=_positions(writes.accepted),
                )
                writes.accepted.end_offsets.clear()
                request_index += 1

    async def Publish(
        self, request: pb.PublishRequest | Unparseable, context: grpc.aio.ServicerContext
    ) -> pb.PublishResponse:
        await reject_unparseable(context, request)
        assert isinstance(request, pb.PublishRequest)
        if not request.events:
            await abort_bad_request(
                context,
                "the request has no events",
                [
                    view_event_pb2.FieldViolation(
                        field="events",
                        reason="REQUIRED",
                        description="events must hold at least one event",
                    )
                ],
            )
        await self._check_request(context, request, 0)
        tally = _Tally()
        async with self._writing(context) as writes:
            await self._ingest(request, 0, tally, writes, "Publish", len(request.events))
            await writes.flush(tally)
        if tally.accepted == 0:
            violations = [
                view_event_pb2.FieldViolation(
                    field=f"events[{r.index}]" + (f".{v.field}" if v.field else ""),
                    description=v.description,
                    reason=v.reason,
                )
                for r in tally.rejections
                for v in r.field_violations
            ]
            await abort_bad_request(
                context,
                f"none of the {tally.received} events is valid (kept on the dead-letter topic)",
                violations,
            )
        return pb.PublishResponse(
            accepted=tally.accepted,
            rejected=tally.rejected,
            rejections=tally.rejections,
            positions=_positions(writes.accepted),
        )


def _count(request: object) -> int:
    if isinstance(request, ScannedRequest):
        return len(request)
    return len(request.events)  # type: ignore[attr-defined]


def _positions(writer: PartitionedWriter) -> list[view_event_pb2.PartitionOffset]:
    return [
        view_event_pb2.PartitionOffset(partition=p, offset=o)
        for p, o in sorted(writer.end_offsets.items())
    ]
