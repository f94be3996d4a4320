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
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def batched_requests(
    events: Iterable[ViewEvent],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[ingest_pb.UploadRequest]:
    """UploadRequests of up to `batch_size` events, built lazily (the upload is never held)."""
    batch: list[ViewEvent] = []
    sequence = 0
    for event in events:
        batch.append(event)
        if len(batch) >= batch_size:
            yield ingest_pb.UploadRequest(events=batch, sequence=sequence)
            if on_batch:
                on_batch(len(batch))
            sequence += 1
            batch = []
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
