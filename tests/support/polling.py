"""The one polling loop of the test tiers (each tier's ``wait_until`` keeps its own defaults)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll_until(cond: Callable[[], Any], timeout_s: float, interval_s: float, what: str = "") -> Any:
    """Call ``cond`` every ``interval_s`` seconds until it returns something truthy, and
    return that. Raises AssertionError naming ``what`` after ``timeout_s`` seconds."""
    give_up = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"{what or 'condition'} not met within {timeout_s}s")
        time.sleep(interval_s)
