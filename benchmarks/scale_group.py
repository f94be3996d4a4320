"""Stats and recommender instances of one consumer group as bench processes: start, wait until
the group answers completely, query, kill -9 (`benchmarks.scale` drives them)."""

from __future__ import annotations

import ast
import asyncio
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from aiokafka.admin import AIOKafkaAdminClient
from google.protobuf import timestamp_pb2
from tqdm import tqdm

from benchmarks.measure import free_port, log_match, wait_log
from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents.v1 import view_event_pb2 as ve
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.processes import health_status, spawn_service, stop_service

REPO = Path(__file__).resolve().parent.parent
WORKDIR = REPO / ".data" / "bench"
# The answer is not there yet (owner dead or replaying, item not applied yet); anything else is
# a failure of the bench.
NOT_YET = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)

PositionProbe = Callable[[grpc.aio.Channel], Awaitable[ve.ConsumerPosition]]


def stats_position(media_id: int) -> PositionProbe:
    """A complete GetMediaStats answer's position: it fans out to every owner."""

    async def probe(channel: grpc.aio.Channel) -> ve.ConsumerPosition:
        reply = await stats_grpc.StatsServiceStub(channel).GetMediaStats(
            stats_pb.GetMediaStatsRequest(media_id=media_id), timeout=5
        )
        return reply.position

    return probe


def recommender_position(media_id: int) -> PositionProbe:
    """A complete GetSimilarMedia answer's position (cheaper than the fallback of
    RecommendForUser, which gathers the whole catalogue)."""

    async def probe(channel: grpc.aio.Channel) -> ve.ConsumerPosition:
        reply = await rec_grpc.RecommenderServiceStub(channel).GetSimilarMedia(
            rec_pb.GetSimilarMediaRequest(media_id=media_id, limit=1), timeout=5
        )
        return reply.position

    return probe


def covers(position: ve.ConsumerPosition, ends: Mapping[int, int]) -> bool:
    """Every partition is in the position, at or past its end offset."""
    offsets = {p.partition: p.offset for p in position.partitions}
    return all(offsets.get(p, -1) >= end for p, end in ends.items())


@dataclass
class Instance:
    """One service process with its own address, state directory and log."""

    service: str  # "stats" or "recommender"
    config: settings.Config
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    last_cpu_s: float = 0.0

    @property
    def address(self) -> str:
        return str(getattr(self.config, f"{self.service}_address"))

    @property
    def state_dir(self) -> Path:
        return Path(getattr(self.config, f"{self.service}_state_dir"))

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = spawn_service(
                f"{self.service}_service", settings.to_environment(self.config), log
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the process so far (the last figure once it is gone)."""
        if self.alive():
            assert self.process is not None
            try:
                self.last_cpu_s = sum(psutil.Process(self.process.pid).cpu_times()[:2])
            except psutil.Error:
                pass
        return self.last_cpu_s

    def serving(self) -> bool:
        return self.alive() and health_status(self.address, timeout=2) == "SERVING"

    def kill(self) -> None:
        """kill -9 the pid this bench started."""
        assert self.process is not None
        self.cpu_seconds()
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            self.cpu_seconds()
            stop_service(self.process)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def log_match(self, pattern: str) -> re.Match[str] | None:
        """The last match of `pattern` in the instance's log."""
        return log_match(self.log_path, pattern)

    async def wait_log(self, pattern: str, timeout: float) -> re.Match[str] | None:
        return await wait_log(self.log_path, pattern, timeout)


class Group:
    """`count` instances of one service in one fresh consumer group on `config`'s topic, each
    with a fresh state directory under .data/bench (removed on close)."""

    def __init__(self, service: str, config: settings.Config, count: int, tag: str) -> None:
        run = uuid.uuid4().hex[:8]
        self.service = service
        self.group_id = f"bench-scale-{service}-{tag}-{run}"
        self.instances: list[Instance] = []
        for index in range(count):
            name = f"scale-{service}-{tag}-{run}-{index}"
            instance_config = config.replace(
                **{
                    f"{service}_address": f"127.0.0.1:{free_port()}",
                    f"{service}_state_dir": str(WORKDIR / f"{name}-state"),
                    f"{service}_group": self.group_id,
                    f"{service}_metrics_port": 0,
                }
            )
            self.instances.append(Instance(service, instance_config, WORKDIR / f"{name}.log"))
        self.started = 0.0

    def start(self, only: int | None = None) -> None:
        """Start every instance (or only instance `only`); the clock of `wait_complete` starts
        at the first start."""
        if not any(i.process for i in self.instances):
            self.started = time.perf_counter()
        for index, instance in enumerate(self.instances):
            if only is None or index == only:
                instance.start()

    def close(self) -> None:
        for instance in self.instances:
            instance.stop()

    async def committed(self, admin: AIOKafkaAdminClient) -> int:
        """Records the group has committed (only for the progress bar)."""
        try:
            offsets = await admin.list_consumer_group_offsets(self.group_id)
        except Exception:  # noqa: BLE001 - progress only
            return 0
        return sum(max(0, o.offset) for o in offsets.values())

    async def wait_complete(
        self,
        ends: Mapping[int, int],
        probe: PositionProbe,
        bootstrap: str,
        via: int = 0,
        timeout: float = 1800,
        desc: str = "",
    ) -> float:
        """Seconds from `start()` until every live instance is SERVING and an answer through
        instance `via` covers `ends` in every partition; a progress bar of committed records."""
        total = sum(ends.values())
        bar = tqdm(total=total, desc=desc or f"{self.service} consume", unit=" ev", unit_scale=True)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        last_progress = 0.0
        try:
            async with grpc.aio.insecure_channel(self.instances[via].address) as channel:
                while time.perf_counter() - self.started < timeout:
                    for instance in self.instances:
                        if instance.process is not None and not instance.alive():
                            if instance.process.returncode != -9:
                                raise RuntimeError(f"instance exited; see {instance.log_path}")
                    live = [i for i in self.instances if i.alive()]
                    if all(i.serving() for i in live):
                        try:
                            if covers(await probe(channel), ends):
                                bar.update(total - bar.n)
                                return time.perf_counter() - self.started
                        except grpc.aio.AioRpcError as error:
                            if error.code() not in NOT_YET:
                                raise
                    if time.monotonic() - last_progress > 1.0:
                        last_progress = time.monotonic()
                        bar.update(min(total, await self.committed(admin)) - bar.n)
                    await asyncio.sleep(0.1)
        finally:
            bar.close()
            await admin.close()
        raise TimeoutError(f"{self.group_id} not complete after {timeout} s")

    def owner_of(self, partition: int, media_id: int) -> Instance:
        """The live instance that answers GetMediaStats for `partition` alone (the owner,
        caught up): a peer call with the partitions header (stats only)."""
        header = (("x-viewevents-partitions", str(partition)),)
        for instance in self.instances:
            if not instance.alive():
                continue
            with grpc.insecure_channel(instance.address) as channel:
                try:
                    stats_grpc.StatsServiceStub(channel).GetMediaStats(
                        stats_pb.GetMediaStatsRequest(media_id=media_id),
                        metadata=header,
                        timeout=5,
                    )
                    return instance
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.NOT_FOUND:  # answered: it owns it
                        return instance
        raise RuntimeError(f"no instance answers for partition {partition}")


async def until_complete(
    instance: Instance, probe: PositionProbe, ends: Mapping[int, int], timeout: float = 600
) -> tuple[float | None, float]:
    """After a kill: (seconds until `instance`'s health left SERVING, i.e. it saw the
    rebalance, or None if never seen; seconds until an answer through it covers every
    partition again), polling every 50 ms."""
    started = time.perf_counter()
    left_serving: float | None = None
    async with grpc.aio.insecure_channel(instance.address) as channel:
        while time.perf_counter() - started < timeout:
            if left_serving is None and not instance.serving():
                left_serving = time.perf_counter() - started
            try:
                if covers(await probe(channel), ends):
                    return left_serving, time.perf_counter() - started
            except grpc.aio.AioRpcError as error:
                if error.code() not in NOT_YET:
                    raise
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{instance.address} not complete {timeout} s after the kill")


def replayed(instance: Instance, ends: Mapping[int, int]) -> int | None:
    """Records of `ends`' partitions the instance had to read after its latest assignment:
    from its log line 'assigned partitions [..]; resuming from stored offsets {..}'."""
    found = instance.log_match(
        r"assigned partitions (\[[^\]]*\]); resuming from stored offsets (\{[^}]*\})"
    )
    if found is None:
        return None
    assigned = set(ast.literal_eval(found.group(1)))
    stored = ast.literal_eval(found.group(2))
    return sum(end - int(stored.get(p, 0)) for p, end in ends.items() if p in assigned)


def ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)
