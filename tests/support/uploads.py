"""An upload in parts, released one by one, so a crash test places each kill by progress: part
k + 1 starts only after kill k, so every kill lands while later parts are still to come."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import grpc

from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload


class PartedUpload:
    """Uploads `events` in `parts` parts in a thread; `release()` lets the next part go."""

    def __init__(
        self, address: str, events: Sequence[ve.ViewEvent], parts: int, batch_size: int
    ) -> None:
        self._gate = threading.Semaphore(0)
        self._address = address
        self._events = events
        self._parts = parts
        self._batch_size = batch_size
        self.accepted = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PartedUpload:
        self._thread.start()
        return self

    def release(self) -> None:
        self._gate.release()

    def _run(self) -> None:
        size = -(-len(self._events) // self._parts)
        try:
            with grpc.insecure_channel(self._address, options=CHANNEL_OPTIONS) as channel:
                for part in range(self._parts):
                    if part:
                        self._gate.acquire()
                    chunk = self._events[part * size : (part + 1) * size]
                    self.accepted += upload(
                        channel, chunk, batch_size=self._batch_size, timeout=600
                    ).accepted
        except Exception as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def finish(self, timeout: float = 600) -> int:
        """Release what is left, wait, and return the events accepted (raises on failure)."""
        self._gate.release(self._parts)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"upload not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.accepted
