"""Services as real subprocesses (`python -m <service>`), their health, and stopping them."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.configs import REPO, config_env, free_port, test_config
from tests.support.waits import wait_for
from viewevents_tools import settings_catalogue as settings

RUNNING: list[ServiceProcess] = []  # killed at the end of the session, whatever happened


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, wait up to `timeout` s, then SIGKILL: the exit code (negative when killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def is_serving(channel: grpc.Channel, service: str = "") -> bool:
    """grpc.health.v1 says SERVING; False while the server is not reachable yet."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1
        )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class ServiceProcess:
    """A service run as `python -m module` with a configuration, like in production."""

    def __init__(self, module: str, config: settings.Config, address: str, log_path: Path) -> None:
        self.module = module
        self.config = config
        self.address = address
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=config_env(self.config),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        RUNNING.append(self)
        return self

    def wait_serving(self, timeout: float = 120.0, channel: grpc.Channel | None = None) -> None:
        """Until grpc.health.v1 says SERVING (consumers: caught up); `channel` for TLS."""

        def serving(ch: grpc.Channel) -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.tail()}")
            return is_serving(ch)

        if channel is not None:
            wait_for(
                lambda: serving(channel),
                timeout,
                message=lambda: f"{self.module} not SERVING: {self.tail()}",
            )
            return
        with grpc.insecure_channel(self.address) as own:
            wait_for(
                lambda: serving(own),
                timeout,
                message=lambda: f"{self.module} not SERVING: {self.tail()}",
            )

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM: graceful shutdown."""
        return stop_process(self.process) if self.process else None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def ingest_and_stats(
    tmp_path: Path, bootstrap: str, **overrides: object
) -> tuple[settings.Config, ServiceProcess, ServiceProcess]:
    """An ingest and a stats service (not started) on free ports, state under `tmp_path`."""
    config = test_config(
        bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        stats_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(tmp_path / "stats-state"),
        **overrides,
    )
    ingest = ServiceProcess(
        "ingest_service", config, config.ingest_address, tmp_path / "ingest.log"
    )
    stats = ServiceProcess("stats_service", config, config.stats_address, tmp_path / "stats.log")
    return config, ingest, stats
