"""A small typed client for the view-event services, over the generated stubs."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from viewevents.v1 import ingest_service_pb2 as ingest_pb
from viewevents.v1 import ingest_service_pb2_grpc as ingest_grpc
from viewevents.v1 import view_event_pb2

ViewEvent = view_event_pb2.ViewEvent
DEFAULT_BATCH_SIZE = 2_000
# Requests are cut by bytes too: half the ingest service's default limit (8 MiB), so that no
# request the client builds is refused as a whole (RESOURCE_EXHAUSTED).
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
_FIELD_OVERHEAD = 6  # tag and length prefix of one event inside an UploadRequest
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def batched_requests(
    events: Iterable[ViewEvent],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> Iterator[ingest_pb.UploadRequest]:
    """UploadRequests of up to `batch_size` events and about `max_request_bytes`, built lazily
    (the upload is never held). An event bigger than that alone still goes alone: callers
    bound single events (event_files.MAX_EVENT_BYTES)."""
    batch: list[ViewEvent] = []
    sequence = 0
    size = 0
    for event in events:
        event_size = event.ByteSize() + _FIELD_OVERHEAD
        if batch and size + event_size > max_request_bytes:
            yield ingest_pb.UploadRequest(events=batch, sequence=sequence)
            if on_batch:
                on_batch(len(batch))
            sequence += 1
            batch = []
            size = 0
        batch.append(event)
        size += event_size
        if len(batch) >= batch_size:
            yield ingest_pb.UploadRequest(events=batch, sequence=sequence)
            if on_batch:
                on_batch(len(batch))
            sequence += 1
            batch = []
            size = 0
    if batch:
        yield ingest_pb.UploadRequest(events=batch, sequence=sequence)
        if on_batch:
            on_batch(len(batch))


def upload(
    channel: grpc.Channel,
    events: Iterable[ViewEvent],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    timeout: float | None = None,
) -> ingest_pb.UploadSummary:
    """Stream `events` to IngestService.Upload; returns once Kafka acknowledged them all.
    gRPC flow control paces the generator, so memory stays flat for any number of events."""
    stub = ingest_grpc.IngestServiceStub(channel)
    return stub.Upload(batched_requests(events, batch_size, on_batch), timeout=timeout)


@dataclass
class LineIndex:
    """Maps an event's index in an upload back to its file and line, in memory proportional to
    the number of *interruptions* (skipped lines), not to the number of events."""

    _starts: list[int] = field(default_factory=list)  # first stream index of each run
    _runs: list[tuple[str, int]] = field(default_factory=list)  # (file, first line) per run
    _count: int = 0
    _last: tuple[str, int] | None = None

    def add(self, path: str, line: int) -> None:
        if self._last != (path, line - 1):
            self._starts.append(self._count)
            self._runs.append((path, line))
        self._last = (path, line)
        self._count += 1

    def locate(self, index: int) -> tuple[str, int]:
        run = bisect.bisect_right(self._starts, index) - 1
        path, first_line = self._runs[run]
        return path, first_line + index - self._starts[run]


@dataclass
class UploadTotals:
    """What a resumable upload achieved, summed over its acks."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    requests: int = 0
    reconnects: int = 0
    rejections: list[ingest_pb.Rejection] = field(default_factory=list)  # index: in the upload


RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


def upload_resumable(
    connect: Callable[[], grpc.Channel],
    events: Iterable[ViewEvent],
    batch_size: int = DEFAULT_BATCH_SIZE,
    window: int = 16,
    max_attempts: int = 8,
    backoff_seconds: float = 0.5,
    on_ack: Callable[[ingest_pb.UploadAck], None] | None = None,
    max_rejections: int = 100,
) -> UploadTotals:
    """Upload through UploadStream, surviving broken connections and service restarts.

    At most `window` batches are unacknowledged (and kept in memory) at a time; when the stream
    breaks with a retryable status, a new connection re-sends the unacknowledged batches in
    order and goes on. Each batch is acknowledged once its events are durable in Kafka, so
    nothing is lost; a batch whose ack was lost in the break is sent twice, and consumers drop
    the duplicate event ids. `max_attempts` counts consecutive failures without progress.
    """
    import threading
    import time
    from collections import deque

    source = iter(batched_requests(events, batch_size))
    pending: deque[ingest_pb.UploadRequest] = deque()
    lock = threading.Condition()
    state = {"exhausted": False, "generation": 0, "next_index": 0}
    starts: dict[int, int] = {}  # sequence -> index in the upload of its first event
    totals = UploadTotals()

    def requests(generation: int) -> Iterator[ingest_pb.UploadRequest]:
        with lock:
            replay = list(pending)
        yield from replay
        while True:
            with lock:
                while len(pending) >= window and state["generation"] == generation:
                    lock.wait(0.5)
                if state["generation"] != generation or state["exhausted"]:
                    return
                request = next(source, None)
                if request is None:
                    state["exhausted"] = True
                    return
                pending.append(request)
                starts[request.sequence] = state["next_index"]
                state["next_index"] += len(request.events)
            yield request

    failures = 0
    while True:
        generation = state["generation"]
        channel = connect()
        try:
            stub = ingest_grpc.IngestServiceStub(channel)
            for ack in stub.UploadStream(requests(generation)):
                with lock:
                    while pending and pending[0].sequence != ack.sequence:
                        starts.pop(pending.popleft().sequence, None)  # ack lost in a break
                    if pending:
                        pending.popleft()
                    first_index = starts.pop(ack.sequence, ack.sequence * batch_size)
                    lock.notify_all()
                failures = 0
                totals.received += ack.received
                totals.accepted += ack.accepted
                totals.rejected += ack.rejected
                totals.requests += 1
                for rejection in ack.rejections:
                    if len(totals.rejections) < max_rejections:
                        in_stream = ingest_pb.Rejection()
                        in_stream.CopyFrom(rejection)  # index within the request -> in the upload
                        in_stream.index = first_index + rejection.index
                        totals.rejections.append(in_stream)
                if on_ack:
                    on_ack(ack)
            with lock:
                if state["exhausted"] and not pending:
                    return totals
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE:
                raise
            failures += 1
            if failures >= max_attempts:
                raise
            totals.reconnects += 1
            time.sleep(backoff_seconds * 2 ** min(failures - 1, 5))
        finally:
            with lock:
                state["generation"] += 1
                lock.notify_all()
            channel.close()


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call (works with and without TLS)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or []) + [self._header]
        return (
            details._replace(metadata=metadata)
            if hasattr(details, "_replace")
            else _CallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                getattr(details, "wait_for_ready", None),
                getattr(details, "compression", None),
            )
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


from collections import namedtuple  # noqa: E402 - only for the call-details shim above


class _CallDetails(
    namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


def open_channel(address: str, tls_ca: str | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to one service: TLS when `tls_ca` (PEM file) is given, bearer token if set."""
    if tls_ca:
        with open(tls_ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
        channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


def upload_file(
    connect: Callable[[], grpc.Channel],
    paths: Iterable[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    **options: object,
) -> UploadTotals:
    """Upload event files (legacy or protobuf JSON lines, .gz ok) with resumable retries.
    Lines that are not events, or cannot be represented, are skipped (the CLI reports them)."""
    from viewevents_client.event_files import iter_file

    events = (
        parsed.event for path in paths for _, parsed in iter_file(path) if parsed.event is not None
    )
    return upload_resumable(connect, events, batch_size, **options)  # type: ignore[arg-type]
