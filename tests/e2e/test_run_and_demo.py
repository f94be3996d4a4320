"""`make run` (viewevents_tools.dev_stack) and `make demo` (viewevents_tools.demo) as a newcomer uses them."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil

from tests.support.configs import REPO, config_env, free_port, port_open, test_config
from tests.support.waits import wait_for


def stack_env(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    config = test_config(
        kafka_bootstrap,
        ingest_address=f"127.0.0.1:{free_port()}",
        stats_address=f"127.0.0.1:{free_port()}",
        recommender_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(tmp_path / "stats"),
        recommender_state_dir=str(tmp_path / "recommender"),
        stats_group=f"run-stats-{time.time_ns()}",
        recommender_group=f"run-rec-{time.time_ns()}",
    )
    return config_env(config)


class LineReader:
    """Reads a child's stdout in a thread, so a test waits for a line with a time limit."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, text: str, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {text!r} after {timeout} s: {''.join(self.seen)}") from None
            if line is None:
                raise EOFError(f"output ended before {text!r}: {''.join(self.seen)}")
            self.seen.append(line)
            if text in line:
                return self.seen

    def rest(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                return self.seen
            self.seen.append(line)
        raise TimeoutError(f"output still open after {timeout} s: {''.join(self.seen)}")


def start_runner(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], LineReader]:
    runner = subprocess.Popen(
        [sys.executable, "-m", "viewevents_tools.dev_stack", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert runner.stdout is not None
    return runner, LineReader(runner.stdout)


def service_children(
    runner: subprocess.Popen[str], count: int, timeout: float = 30
) -> list[psutil.Process]:
    def started() -> list[psutil.Process]:
        children = [c for c in psutil.Process(runner.pid).children() if "-m" in c.cmdline()]
        return children if len(children) >= count else []

    return wait_for(
        started, timeout, interval=0.05, message=f"runner did not start {count} services"
    )


def all_gone(processes: list[psutil.Process], timeout: float = 30) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        process.kill()
    return not alive


def test_runner_starts_all_three_and_ctrl_c_stops_them(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = stack_env(kafka_bootstrap, tmp_path)
    runner, output = start_runner(env, "--start-kafka")
    lines = output.until("Ctrl-C stops everything", timeout=120)
    assert not any("starting broker" in line for line in lines)  # it reused the test broker
    table = "".join(lines)
    for module, setting in (
        ("ingest_service", "VIEWEVENTS_INGEST_ADDRESS"),
        ("stats_service", "VIEWEVENTS_STATS_ADDRESS"),
        ("recommender_service", "VIEWEVENTS_RECOMMENDER_ADDRESS"),
    ):
        row = next(line for line in lines if line.strip().startswith(module)).split()
        assert row[1] == env[setting] and row[2] in {"SERVING", "NOT_SERVING"}, table
    children = service_children(runner, 3)
    runner.send_signal(signal.SIGINT)
    rest = output.rest(timeout=60)
    assert runner.wait(10) == 0
    assert sorted(line.strip() for line in rest if "stopped (exit" in line) == [
        "ingest_service stopped (exit 0)",
        "recommender_service stopped (exit 0)",
        "stats_service stopped (exit 0)",
    ]
    assert all_gone(children, timeout=5)
    assert port_open(int(kafka_bootstrap.rsplit(":", 1)[1])), (
        "the runner stopped a broker it did not start"
    )


def test_runner_ctrl_c_during_start_up_stops_every_service(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = stack_env(kafka_bootstrap, tmp_path)
    runner, output = start_runner(env)
    children = service_children(runner, 3)  # started, not yet listening or serving
    runner.send_signal(signal.SIGINT)
    output.rest(timeout=60)
    assert runner.wait(10) == 0
    assert all_gone(children), "services outlived the runner"


def test_runner_killed_with_sigkill_takes_its_services_along(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    env = stack_env(kafka_bootstrap, tmp_path)
    runner, output = start_runner(env)
    children = service_children(runner, 3)
    runner.kill()
    runner.wait(10)
    assert all_gone(children), "services outlived a runner killed with SIGKILL"


def test_demo_shows_the_whole_product(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = stack_env(kafka_bootstrap, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "viewevents_tools.demo", "--events", "30000"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for heading in (
        "Top 5 media by view time",
        "View time per hour of media",
        "Media similar to",
        "Recommended for user 42",
    ):
        assert heading in out, out
    assert "both consumers applied the upload" in out
