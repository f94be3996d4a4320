"""Bounded staleness (opt-in): ingest holds writes back while a watched consumer group is too
far behind the view topic, so that what it acknowledges becomes visible in that group's answers
within about `max lag / the group's consume rate`.

Without it Kafka absorbs any burst and the consumers catch up later: an upload faster than the
consumers leaves every answer stale by the backlog (seconds for a 2M-event upload). With it the
upload runs at the consumers' pace instead. The hold is back-pressure, not an error: an RPC
waits before writing its next request, stops reading its stream, and gRPC flow control slows the
client. A group that has made no progress for `stall_seconds` (no member running, or stuck) is
not waited for, so a stopped consumer never stops ingest; reading the lag failing does not
hold writes back either (Kafka itself then decides whether writes go through).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from viewevents.group_lag import GroupLag, GroupLagReader
from viewevents.metrics import ADMISSION_HELD, ADMISSION_WAIT_SECONDS, WATCHED_GROUP_LAG

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    committed: int
    since: float  # when the group's committed offsets last moved


class AdmissionPolicy:
    """Which watched groups hold writes back, from successive lag readings (no I/O)."""

    def __init__(self, max_lag: int, stall_seconds: float) -> None:
        if max_lag < 0:
            raise ValueError(f"the lag bound must not be negative, got {max_lag}")
        self.max_lag = max_lag
        self.stall_seconds = stall_seconds
        self._progress: dict[str, _Progress] = {}

    def holding(self, now: float, lags: Mapping[str, GroupLag]) -> list[str]:
        """The groups more than `max_lag` records behind that moved within `stall_seconds`."""
        held_by: list[str] = []
        for group, lag in lags.items():
            progress = self._progress.get(group)
            if progress is None or progress.committed != lag.committed:
                progress = self._progress[group] = _Progress(lag.committed, now)
            stalled = now - progress.since >= self.stall_seconds
            if lag.records > self.max_lag and not stalled:
                held_by.append(group)
        return held_by


class LagAdmission:
    """The gate every write passes (`admit`), opened and closed by `run` polling the lag."""

    def __init__(
        self, reader: GroupLagReader, policy: AdmissionPolicy, poll_seconds: float
    ) -> None:
        self._reader = reader
        self._policy = policy
        self._poll_seconds = poll_seconds
        self._open = asyncio.Event()
        self._open.set()
        self.held_by: list[str] = []

    async def admit(self) -> None:
        """Return at once while writes may go; else when the watched groups caught up."""
        if self._open.is_set():
            return
        started = time.monotonic()
        try:
            await self._open.wait()
        finally:
            ADMISSION_WAIT_SECONDS.inc(time.monotonic() - started)

    def update(self, lags: Mapping[str, GroupLag], now: float) -> None:
        for group, lag in lags.items():
            WATCHED_GROUP_LAG.labels(group).set(lag.records)
        held_by = self._policy.holding(now, lags)
        if held_by and not self.held_by:
            log.info(
                "holding writes back: group(s) %s more than %d records behind",
                ", ".join(held_by),
                self._policy.max_lag,
            )
        elif self.held_by and not held_by:
            log.info("writes go on: the watched groups are within %d records", self._policy.max_lag)
        self.held_by = held_by
        if held_by:
            self._open.clear()
        else:
            self._open.set()
        ADMISSION_HELD.set(1 if held_by else 0)

    def open(self) -> None:
        self.held_by = []
        self._open.set()
        ADMISSION_HELD.set(0)

    async def run(self) -> None:
        """Poll until cancelled; while the lag cannot be read, writes are not held back."""
        failing = False
        try:
            while True:
                try:
                    lags = await self._reader.read()
                except Exception as error:  # noqa: BLE001 - Kafka slow or down: fail open
                    if not failing:
                        log.warning("cannot read the watched groups' lag (%r): not holding", error)
                    failing = True
                    self.open()
                else:
                    failing = False
                    self.update(lags, time.monotonic())
                await asyncio.sleep(self._poll_seconds)
        finally:
            self.open()
            await self._reader.close()
