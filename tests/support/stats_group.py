"""A stats consumer group of several instances behind one ingest service, for the scale-out
tests."""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.support.configs import free_port, test_config, unique_name
from tests.support.processes import ServiceProcess
from viewevents.v1 import stats_service_pb2 as pb
from viewevents.v1 import stats_service_pb2_grpc as pb_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_client.uploads import CHANNEL_OPTIONS, upload


class StatsGroup:
    """Stats instances (one consumer group, own state each) and an ingest service on one topic;
    instances in another group (`add(name, group=...)`) serve as single-instance references."""

    def __init__(
        self, tmp_path: Path, bootstrap: str, partitions: int, prefix: str = "scale"
    ) -> None:
        self.tmp_path = tmp_path
        self.config = test_config(
            bootstrap,
            ingest_address=f"127.0.0.1:{free_port()}",
            stats_group=unique_name(prefix),
            topic_partitions=partitions,
            stats_page_token_secret="shared-secret",
        )
        self.ingest = ServiceProcess(
            "ingest_service", self.config, self.config.ingest_address, tmp_path / "ingest.log"
        )
        self.stats: list[ServiceProcess] = []

    def add(self, name: str, group: str | None = None) -> ServiceProcess:
        config = self.config.replace(
            stats_address=f"127.0.0.1:{free_port()}",
            stats_state_dir=str(self.tmp_path / name),
            stats_group=group or self.config.stats_group,
        )
        process = ServiceProcess(
            "stats_service", config, config.stats_address, self.tmp_path / f"{name}.log"
        ).start()
        self.stats.append(process)
        return process

    def send(self, events: list[ve.ViewEvent]) -> None:
        with grpc.insecure_channel(self.config.ingest_address, options=CHANNEL_OPTIONS) as channel:
            upload(channel, iter(events), batch_size=2_000, timeout=300)

    def stop(self) -> None:
        for process in self.stats:
            process.stop()
        self.ingest.stop()


def stats_of(channel: grpc.Channel, media: int) -> tuple[ve.ConsumerPosition, tuple[int, int, int]]:
    """GetMediaStats for `media`: (position, (starts, view time, unique viewers)), for a Poller."""
    reply = pb_grpc.StatsServiceStub(channel).GetMediaStats(
        pb.GetMediaStatsRequest(media_id=media), timeout=20
    )
    s = reply.stats
    return reply.position, (s.starts, s.view_time_seconds, s.unique_viewers)
