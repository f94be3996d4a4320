"""`make run` (viewevents.runner) and `make demo` (viewevents.demo) as a newcomer uses them."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, config_env, free_port, test_config
from viewevents.logs import REQUEST_ID, _JsonFormatter, _RequestIdFilter


def stack_env(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    config = test_config(kafka_bootstrap, ingest_address=f"127.0.0.1:{free_port()}",
                         stats_address=f"127.0.0.1:{free_port()}",
                         recommender_address=f"127.0.0.1:{free_port()}",
                         stats_state_dir=str(tmp_path / "stats"),
                         recommender_state_dir=str(tmp_path / "recommender"),
                         stats_group=f"run-stats-{time.time_ns()}",
                         recommender_group=f"run-rec-{time.time_ns()}")
    return config_env(config)


@pytest.mark.integration
def test_runner_starts_all_three_and_ctrl_c_stops_them(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = stack_env(kafka_bootstrap, tmp_path)
    runner = subprocess.Popen([sys.executable, "-m", "viewevents.runner"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    assert runner.stdout is not None
    for line in runner.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    table = "".join(lines)
    for module, setting in (("ingest_service", "VIEWEVENTS_INGEST_ADDRESS"),
                            ("stats_service", "VIEWEVENTS_STATS_ADDRESS"),
                            ("recommender_service", "VIEWEVENTS_RECOMMENDER_ADDRESS")):
        row = next(line for line in lines if line.strip().startswith(module))
        assert env[setting] in row and "SERVING" in row, table
    runner.send_signal(signal.SIGINT)
    rest, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0
    assert sorted(line for line in rest.splitlines() if "stopped (exit" in line) == [
        "ingest_service stopped (exit 0)", "recommender_service stopped (exit 0)",
        "stats_service stopped (exit 0)"]


@pytest.mark.integration
def test_demo_shows_the_whole_product(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = stack_env(kafka_bootstrap, tmp_path)
    result = subprocess.run([sys.executable, "-m", "viewevents.demo", "--events", "30000"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for heading in ("Top 5 media by view time", "View time per hour of media", "Media similar to",
                    "Recommended for user 42"):
        assert heading in out, out
    assert "both consumers applied the upload" in out


def test_json_logs_carry_service_and_request_id() -> None:
    record = logging.LogRecord("viewevents.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    token = REQUEST_ID.set("abc123")
    try:
        _RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(_JsonFormatter("stats").format(record))
    assert entry["service"] == "stats" and entry["request_id"] == "abc123"
    assert entry["message"] == "hello world" and entry["level"] == "INFO"
