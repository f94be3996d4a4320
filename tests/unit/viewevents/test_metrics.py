"""The unauthenticated metrics port binds loopback unless the operator opens it.

127.0.0.2 is another local address: a 0.0.0.0 listener answers there, a 127.0.0.1 one does not,
so it tells the two binds apart.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.support import free_port
from viewevents import config as settings
from viewevents.metrics import serve_metrics


def answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def test_metrics_listen_on_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIEWEVENTS_METRICS_HOST", raising=False)
    assert settings.load(settings.SHARED_SETTINGS, env={}).metrics_host == "127.0.0.1"
    port = free_port()
    serve_metrics(port, "test")
    assert answers("127.0.0.1", port)
    assert not answers("127.0.0.2", port)


def test_metrics_host_setting_opens_another_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIEWEVENTS_METRICS_HOST", "0.0.0.0")
    port = free_port()
    serve_metrics(port, "test")
    assert answers("127.0.0.1", port) and answers("127.0.0.2", port)
    explicit = free_port()
    serve_metrics(explicit, "test", host="127.0.0.2")
    assert answers("127.0.0.2", explicit) and not answers("127.0.0.1", explicit)


def test_a_watched_caches_counters_are_read_at_each_scrape() -> None:
    """Plain integers a cache keeps are exposed as a counter per outcome and a size gauge, as
    they are when scraped; watching again under the same names replaces the source."""
    from prometheus_client import REGISTRY, generate_latest

    from viewevents.metrics import watch_cache

    counts = {"hit": 3, "load": 1, "bytes": 4096}
    watch_cache("test", "rollups", lambda: counts)
    text = generate_latest(REGISTRY).decode()
    assert (
        'viewevents_cache_lookups_total{cache="rollups",outcome="hit",service="test"} 3.0' in text
    )
    assert 'viewevents_cache_bytes{cache="rollups",service="test"} 4096.0' in text
    counts["hit"] = 7
    watch_cache("test", "rollups", lambda: {"hit": 8, "bytes": 1})
    text = generate_latest(REGISTRY).decode()
    assert 'outcome="hit",service="test"} 8.0' in text
    assert 'outcome="load",service="test"' not in text
