"""Configurations for services under test: fresh topic names, free ports, child environments."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from viewevents_tools import settings_catalogue as settings

REPO = Path(__file__).resolve().parents[2]
TEST_KAFKA_PORT = int(os.environ.get("VIEWEVENTS_TEST_KAFKA_PORT", "19092"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_config(bootstrap: str, **overrides: object) -> settings.Config:
    """A configuration with fresh topic names and consumer groups, so tests never see each
    other's events or share a group (a consumer still leaving a group when the next test's joins
    would otherwise take part in its rebalance)."""
    base = settings.load(env={})
    values: dict[str, object] = dict(
        kafka_bootstrap=bootstrap,
        view_topic=unique_name("view-events"),
        dead_letter_topic=unique_name("dead-letter"),
        stats_group=unique_name("stats"),
        recommender_group=unique_name("rec"),
        ingest_metrics_port=0,
        stats_metrics_port=0,
        recommender_metrics_port=0,
    )
    values.update(overrides)
    return base.replace(**values)


test_config.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def stack_config(bootstrap: str, state_root: Path, **overrides: object) -> settings.Config:
    """test_config for all three services at once: free ports, state under `state_root`, fresh
    consumer groups (the tests that start a whole stack on a broker of their own)."""
    values: dict[str, object] = dict(
        ingest_address=f"127.0.0.1:{free_port()}",
        stats_address=f"127.0.0.1:{free_port()}",
        recommender_address=f"127.0.0.1:{free_port()}",
        stats_state_dir=str(state_root / "stats"),
        recommender_state_dir=str(state_root / "rec"),
        stats_group=unique_name("stats"),
        recommender_group=unique_name("rec"),
    )
    values.update(overrides)
    return test_config(bootstrap, **values)


def config_env(config: settings.Config) -> dict[str, str]:
    """The environment variables that make a service subprocess use `config`."""
    return settings.to_environment(config)
