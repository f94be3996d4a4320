"""The one polling loop of the test suite: wait for a condition, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call `condition` until it returns something truthy and return that (never None, so a
    condition typed `X | None` gives an `X`); TimeoutError after `timeout` s. Exceptions from
    `condition` propagate: callers decide which failures mean "not yet". `message` may be a
    callable, evaluated only on timeout (e.g. a service's log)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"after {timeout} s: {text}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
