"""A throw-away stack for one drill: its own broker and its own three services.

Why its own: a drill kills things. The broker runs from deploy/kafka.sh on free ports with its
data under .data/drills/, the services run on free ports with fresh topics, consumer groups and
state directories, so neither a developer's stack nor the shared test broker is ever touched.
Everything is killed by the pid this module started (the broker's from its own pidfile), never
by name, and `Stack.close()` stops all of it whatever happened before.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import psutil

from viewevents.v1 import recommender_service_pb2 as rec_pb
from viewevents.v1 import recommender_service_pb2_grpc as rec_grpc
from viewevents.v1 import stats_service_pb2 as stats_pb
from viewevents.v1 import stats_service_pb2_grpc as stats_grpc
from viewevents_tools import settings_catalogue as settings
from viewevents_tools.processes import REPO, health_status, spawn_service, stop_service

DRILLS_DATA = REPO / ".data" / "drills"
KAFKA_SH = REPO / "deploy" / "kafka.sh"


def free_port() -> int:
    """A port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll `condition` until it returns something truthy (returned); TimeoutError after
    `timeout` seconds. Drills wait for conditions, never for fixed times."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Broker:
    """A single-node Kafka from deploy/kafka.sh on its own ports and data directory."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "broker.pid"

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            KAFKA_DATA_DIR=str(self.data_dir),
        )

    def start(self) -> None:
        """Start (or restart on the same data) and wait until it answers (kafka.sh waits)."""
        if port_open(self.port):  # kafka.sh would "reuse" whatever answers there: refuse
            raise RuntimeError(f"port {self.port} is taken; the drill needs its own broker")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "kafka-sh.log", "ab") as log:
            subprocess.run(
                [str(KAFKA_SH), "start"],
                env=self._env(),
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def kill(self, timeout: float = 30.0) -> None:
        """kill -9 the java process this broker's pidfile names, and wait until it is gone."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("no broker pid to kill")
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: not self.alive() and not port_open(self.port), timeout, f"broker pid {pid} gone"
        )

    def stop(self) -> None:
        """Stop it (kafka.sh stop: SIGTERM, then SIGKILL after 30 s), by its own pidfile only."""
        if self.pid() is None:
            return
        with open(self.data_dir / "kafka-sh.log", "ab") as log:
            subprocess.run(
                [str(KAFKA_SH), "stop"],
                env=self._env(),
                check=False,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


@dataclass
class Service:
    """One service process of the drill; restarted under the same settings after a kill."""

    name: str  # ingest, stats, recommender
    module: str
    address: str
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    incarnation: int = 0

    def spawn(self) -> None:
        """Start a new incarnation without waiting (recovery is timed by the caller)."""
        self.incarnation += 1
        with open(self.log_dir / f"{self.name}-{self.incarnation}.log", "ab") as log:
            self.process = spawn_service(self.module, self.env, log)

    def serving(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            return False
        return health_status(self.address) == "SERVING"

    def wait_serving(self, timeout: float) -> None:
        def check() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; "
                    f"see {self.log_dir}/{self.name}-{self.incarnation}.log"
                )
            return self.serving()

        wait_until(check, timeout, f"{self.name} SERVING")

    def kill(self) -> None:
        """kill -9 the pid this drill started."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait (the clean stop the state check needs); the exit code."""
        if self.process is None:
            return None
        code = stop_service(self.process)
        self.process = None
        return code

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


SERVICE_MODULES = {
    "ingest": "ingest_service",
    "stats": "stats_service",
    "recommender": "recommender_service",
}


class Stack:
    """Broker + ingest + stats + recommender, all the drill's own, under `workdir`."""

    def __init__(self, workdir: Path, **overrides: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.broker = Broker(workdir / "kafka")
        run = uuid.uuid4().hex[:8]
        values: dict[str, Any] = dict(
            kafka_bootstrap=self.broker.bootstrap,
            view_topic=f"drill-view-events-{run}",
            dead_letter_topic=f"drill-dead-letter-{run}",
            ingest_address=f"127.0.0.1:{free_port()}",
            stats_address=f"127.0.0.1:{free_port()}",
            recommender_address=f"127.0.0.1:{free_port()}",
            stats_state_dir=str(workdir / "state" / "stats"),
            recommender_state_dir=str(workdir / "state" / "recommender"),
            stats_group=f"drill-stats-{run}",
            recommender_group=f"drill-recommender-{run}",
            ingest_metrics_port=0,
            stats_metrics_port=0,
            recommender_metrics_port=0,
        )
        values.update(overrides)
        # env={}: the developer's VIEWEVENTS_* variables must not point the drill at their stack.
        self.config = settings.load(env={}).replace(**values)
        env = settings.to_environment(self.config)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        self.services = {
            name: Service(name, module, getattr(self.config, f"{name}_address"), env, logs)
            for name, module in SERVICE_MODULES.items()
        }
        self._previous_sigterm: Any = None

    def start(self, timeout: float = 180.0) -> None:
        """Broker, then ingest (creates the topics), then the consumers; all SERVING."""
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.broker.start()
        for service in self.services.values():
            service.spawn()
            service.wait_serving(timeout)

    def all_serving(self) -> bool:
        return all(s.serving() for s in self.services.values())

    def close(self, remove_data: bool = True) -> None:
        """Stop every service and the broker (own pids only); drop the bulky data unless kept.
        Logs stay under workdir/logs."""
        for service in self.services.values():
            try:
                service.stop()
            except Exception as error:  # noqa: BLE001 - go on tearing down the rest
                print(f"drill: stopping {service.name} failed: {error!r}")
        self.broker.stop()
        if remove_data:
            shutil.rmtree(self.workdir / "kafka" / "log", ignore_errors=True)
            shutil.rmtree(self.workdir / "state", ignore_errors=True)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM to the drill unwinds through its `finally` blocks, so the broker (which does
    not die with the drill the way the services do) is stopped too."""
    raise SystemExit(128 + signum)


def run_dir(kind: str) -> Path:
    """A fresh directory for one run's broker data, state and logs."""
    return DRILLS_DATA / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def position(name: str, address: str) -> dict[int, int] | None:
    """The consumer's applied offsets, from the cheapest query that carries them."""
    try:
        with grpc.insecure_channel(address) as channel:
            if name == "stats":
                reply = stats_grpc.StatsServiceStub(channel).ListTopMedia(
                    stats_pb.ListTopMediaRequest(
                        start_time={"seconds": 0}, end_time={"seconds": 60}, limit=1
                    ),
                    timeout=5,
                )
            else:
                reply = rec_grpc.RecommenderServiceStub(channel).RecommendForUser(
                    rec_pb.RecommendForUserRequest(user_id=1), timeout=5
                )
            return {p.partition: p.offset for p in reply.position.partitions}
    except grpc.RpcError:
        return None


def wait_applied(name: str, address: str, targets: dict[int, int], timeout: float) -> None:
    """Until the consumer at `address` has applied every partition up to `targets`."""

    def covered() -> bool:
        got = position(name, address)
        return got is not None and all(got.get(p, 0) >= end for p, end in targets.items())

    wait_until(covered, timeout, f"{name} applied {sum(targets.values())} records", interval=1.0)
