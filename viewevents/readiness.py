"""Whether a service should say SERVING, and whether Kafka counts as reachable.

`Readiness` is a yes/no that the bootstrap keeps grpc.health.v1 equal to, both ways, for as
long as the process runs. `Reachability` is the pure rule that turns probe results into
"Kafka is down" only after a grace period (a single lost request is not an outage), and
`watch_kafka` runs a cheap probe (a metadata request) periodically and reports changes.
`until_kafka_answers` retries a start-up Kafka step with back-off (`Backoff`, pure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 3.0
OUTAGE_AFTER_S = 5.0  # unreachable for this long: health goes NOT_SERVING


class Readiness:
    """A flag with a reason that can be awaited for changes (one event loop only)."""

    def __init__(self, ready: bool = False, reason: str = "starting") -> None:
        self._ready = ready
        self.reason = reason
        self._changed = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    def set(self, ready: bool, reason: str) -> None:
        """Record the current state; wakes the waiters when it differs from the last one."""
        if ready == self._ready:
            return
        self._ready = ready
        self.reason = reason
        self._changed.set()
        self._changed = asyncio.Event()

    def next_change(self) -> asyncio.Event:
        """An event set at the next change; take it BEFORE reading `ready`, so that a change
        between the read and the wait is not missed."""
        return self._changed


class Reachability:
    """Kafka is unreachable once every probe for `grace` seconds failed, reachable again at the
    first success. Pure: the caller supplies the clock."""

    def __init__(self, grace: float = OUTAGE_AFTER_S) -> None:
        self.grace = grace
        self.reachable = True
        self.failing_since: float | None = None

    def observe(self, ok: bool, now: float) -> bool:
        """Record a probe's outcome at `now`; returns True when `reachable` changed."""
        if ok:
            self.failing_since = None
            changed = not self.reachable
            self.reachable = True
            return changed
        if self.failing_since is None:
            self.failing_since = now
        if self.reachable and now - self.failing_since >= self.grace:
            self.reachable = False
            return True
        return False


async def watch_kafka(
    probe: Callable[[], Awaitable[object]],
    on_change: Callable[[bool], None],
    interval: float = PROBE_INTERVAL_S,
    timeout: float = PROBE_TIMEOUT_S,
    grace: float = OUTAGE_AFTER_S,
) -> None:
    """Probe Kafka every `interval` seconds until cancelled; call `on_change(reachable)` when
    the verdict changes. Logs one line per change, however long the outage."""
    state = Reachability(grace)
    first_error: BaseException | None = None
    while True:
        try:
            await asyncio.wait_for(probe(), timeout)
            ok = True
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except BaseException as error:  # noqa: BLE001 - any failure means "not reachable now"
            ok = False
            first_error = first_error or error
        since = state.failing_since
        if state.observe(ok, time.monotonic()):
            if state.reachable:
                down = time.monotonic() - since if since is not None else 0.0
                log.warning("Kafka reachable again after %.0f s", down)
                first_error = None
            else:
                log.error(
                    "Kafka unreachable for %.0f s (%r); health NOT_SERVING until it is back",
                    state.grace,
                    first_error,
                )
            on_change(state.reachable)
        elif ok:
            first_error = None
        await asyncio.sleep(interval)


START_RETRY_FIRST_S = 0.5  # first pause after a start-up Kafka step failed
START_RETRY_MAX_S = 30.0  # pauses double up to this: a long outage logs a line every 30 s


class Backoff:
    """Pauses that double from `first` up to `maximum`. Pure: the caller sleeps."""

    def __init__(self, first: float = START_RETRY_FIRST_S, maximum: float = START_RETRY_MAX_S):
        self.first = first
        self.maximum = maximum
        self._next = first

    def next_pause(self) -> float:
        pause = self._next
        self._next = min(self._next * 2, self.maximum)
        return pause


async def until_kafka_answers(
    what: str,
    step: Callable[[], Awaitable[T]],
    backoff: Backoff | None = None,
    timeout: float = 30.0,
) -> T:
    """Run a start-up Kafka step until it succeeds, pausing with back-off in between.

    A service started before Kafka (or during an outage) waits here rather than crash-looping;
    each attempt is bounded by `timeout` and the whole wait is cancellable, so SIGTERM during
    start-up still ends the process promptly (see viewevents.bootstrap.main)."""
    pauses = backoff or Backoff()
    attempt = 1
    while True:
        try:
            return await asyncio.wait_for(step(), timeout)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a Kafka step is retried
            pause = pauses.next_pause()
            log.warning(
                "waiting for Kafka: %s failed (attempt %d: %r); retrying in %.1f s",
                what,
                attempt,
                error,
                pause,
            )
        attempt += 1
        await asyncio.sleep(pause)
