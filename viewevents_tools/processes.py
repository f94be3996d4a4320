"""Services as child processes, for the tools that start them (dev stack, demo, benchmarks):
start with the kernel's promise that they die with their parent, wait for health, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def spawn_service(
    module: str, env: Mapping[str, str] | None = None, output: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m module` in its own session (a terminal's Ctrl-C reaches only the parent, which
    stops each child once), dying with the parent even if the parent is killed with SIGKILL
    (viewevents_tools.die_with_parent; no `preexec_fn`, which can deadlock a threaded parent)."""
    return subprocess.Popen(
        [sys.executable, "-m", "viewevents_tools.die_with_parent", str(os.getpid()), module],
        cwd=REPO,
        env=None if env is None else dict(env),
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,
    )


def health_status(address: str, timeout: float = 1.0) -> str:
    """The overall grpc.health.v1 status name, or NOT_LISTENING."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "NOT_LISTENING"


def wait_serving(
    process: subprocess.Popen[bytes], address: str, timeout: float = 120.0, what: str = "service"
) -> None:
    """Until the service's health says SERVING; raises if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if health_status(address) == "SERVING":
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not SERVING after {timeout:.0f} s")


def start_service(
    module: str, env: Mapping[str, str], address: str, log_path: Path, timeout: float = 120.0
) -> subprocess.Popen[bytes]:
    """Start `python -m module` (output to `log_path`) and wait until it is SERVING."""
    with open(log_path, "ab") as log:
        process = spawn_service(module, env, log)
    try:
        wait_serving(process, address, timeout, what=f"{module} (log {log_path})")
    except BaseException:
        stop_service(process)
        raise
    return process


def stop_service(process: subprocess.Popen[bytes], grace_seconds: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after the grace period; returns the exit code."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
