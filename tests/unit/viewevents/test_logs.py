"""JSON log lines (moved from the dev-stack test: it needs no services)."""

from __future__ import annotations

import json
import logging

from viewevents.logs import REQUEST_ID, _JsonFormatter, _RequestIdFilter


def test_json_logs_carry_service_and_request_id() -> None:
    record = logging.LogRecord(
        "viewevents.test", logging.INFO, __file__, 1, "hello %s", ("world",), None
    )
    token = REQUEST_ID.set("abc123")
    try:
        _RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(_JsonFormatter("stats").format(record))
    assert entry["service"] == "stats" and entry["request_id"] == "abc123"
    assert entry["message"] == "hello world" and entry["level"] == "INFO"
