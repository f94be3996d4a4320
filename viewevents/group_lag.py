"""How far consumer groups are behind a topic, read from Kafka alone (as `kafka-consumer-groups
--describe` does): the topic's end offsets minus each group's committed offsets.

A group's committed offsets trail what its members applied by up to one commit interval
(VIEWEVENTS_GROUP_COMMIT_INTERVAL_MS), so the lag read here is an upper bound on the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


@dataclass(frozen=True)
class GroupLag:
    """One group's position on the topic: records behind the end, and the sum of its committed
    offsets (which only grows while the group makes progress)."""

    records: int
    committed: int


def lag_of(
    ends: dict[int, int], starts: dict[int, int], committed: dict[int, int | None]
) -> GroupLag:
    """Records between a group's committed offsets and the end of each partition; a partition
    the group never committed counts from the start of the log (all of it is still to read)."""
    behind = done = 0
    for partition, end in ends.items():
        offset = committed.get(partition)
        if offset is None or offset < 0:
            offset = starts.get(partition, 0)
        behind += max(0, end - offset)
        done += offset
    return GroupLag(behind, done)


class GroupLagReader:
    """Reads the lag of `groups` on `topic`: one ListOffsets request for the end offsets and
    one OffsetFetch per group, each bounded by `timeout` seconds. The topic's partitions are
    read again every `partitions_refresh_s` (an operator may add partitions)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        groups: Sequence[str],
        timeout: float = 5.0,
        partitions_refresh_s: float = 30.0,
    ) -> None:
        self.topic = topic
        self.groups = tuple(groups)
        self._bootstrap = bootstrap
        self._timeout = timeout
        self._partitions_refresh_s = partitions_refresh_s
        self._clients: tuple[AIOKafkaConsumer, AIOKafkaAdminClient] | None = None
        self._partitions: list[TopicPartition] = []
        self._partitions_read_at = 0.0
        self._coordinators: dict[str, int] = {}

    async def close(self) -> None:
        if self._clients is not None:
            offsets, admin = self._clients
            self._clients = None
            await asyncio.gather(offsets.stop(), admin.close(), return_exceptions=True)

    async def read(self) -> dict[str, GroupLag]:
        """The lag of every group now; clients that failed are replaced at the next call."""
        try:
            return await asyncio.wait_for(self._read(), self._timeout)
        except BaseException:
            await self.close()
            raise

    async def _read(self) -> dict[str, GroupLag]:
        if self._clients is None:
            offsets = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap,
                enable_auto_commit=False,
                client_id="viewevents-lag",
            )  # no group: it only asks for offsets
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self._bootstrap, client_id="viewevents-lag"
            )
            self._clients = (offsets, admin)
            await offsets.start()
            await admin.start()
            self._partitions = []
            self._coordinators.clear()
        offsets, admin = self._clients
        now = time.monotonic()
        if not self._partitions or now - self._partitions_read_at >= self._partitions_refresh_s:
            [described] = await admin.describe_topics([self.topic])
            found = {p["partition"] for p in described["partitions"]}
            if not found:
                raise LookupError(f"topic {self.topic} has no partitions (not created yet?)")
            self._partitions = [TopicPartition(self.topic, p) for p in sorted(found)]
            self._partitions_read_at = now
        ends_by_tp, committed = await asyncio.gather(
            offsets.end_offsets(self._partitions),
            asyncio.gather(*(self._committed(admin, group) for group in self.groups)),
        )
        ends = {tp.partition: offset for tp, offset in ends_by_tp.items()}
        starts: dict[int, int] = {}
        if any(len(c) < len(ends) for c in committed):  # some partition never committed
            starts = {
                tp.partition: offset
                for tp, offset in (await offsets.beginning_offsets(self._partitions)).items()
            }
        return {group: lag_of(ends, starts, c) for group, c in zip(self.groups, committed)}

    async def _committed(self, admin: AIOKafkaAdminClient, group: str) -> dict[int, int | None]:
        coordinator = self._coordinators.get(group)
        if coordinator is None:
            coordinator = self._coordinators[group] = await admin.find_coordinator(group)
        try:
            found = await admin.list_consumer_group_offsets(group, coordinator, self._partitions)
        except Exception:
            self._coordinators.pop(group, None)  # it may have moved: look it up again next time
            raise
        return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}
