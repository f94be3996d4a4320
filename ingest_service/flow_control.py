"""The bound on unacknowledged batches of one RPC: the source of gRPC back-pressure.

While `limit` batches wait for Kafka's acknowledgement, `acquire` waits for the oldest one, so
the RPC stops reading its request stream and gRPC flow control slows the client down. What
"waiting for an acknowledgement" means (deadline, offsets, metrics) is the caller's `settle`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class FlowController(Generic[T]):
    """At most `limit` pending items (shipped, unacknowledged batches), settled oldest first."""

    def __init__(self, limit: int, settle: Callable[[T], Awaitable[None]]) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self._limit = limit
        self._settle = settle
        self._pending: deque[T] = deque()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def acquire(self) -> None:
        """Until there is room for one more batch; an error of a settled batch propagates."""
        while len(self._pending) >= self._limit:
            await self._settle(self._pending.popleft())

    def release_later(self, item: T) -> None:
        """Track a shipped batch (call after `acquire`); it is released once settled."""
        self._pending.append(item)

    async def drain(self) -> None:
        """Until every pending batch is settled (the first failure propagates)."""
        while self._pending:
            await self._settle(self._pending.popleft())

    def abandon(self) -> list[T]:
        """Forget every pending batch (after a failure) and hand them back to be cleaned up."""
        items = list(self._pending)
        self._pending.clear()
        return items
