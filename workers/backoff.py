"""Exponential backoff with jitter for the worker's loops, and a cancellation-safe wait."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from headrace.client.backoff import BackoffPolicy

log = logging.getLogger(__name__)

LOOP_BACKOFF = BackoffPolicy(base_s=0.05, cap_s=2.0, jitter=0.25)


class Backoff:
    """Backoff of one loop: 50 ms doubling up to 2 s, 25 % jitter (:data:`LOOP_BACKOFF`).

    Args:
        what: the operation, for log lines.
        on_state: called with False on each failure and True on each success.
        sleep: how to wait (e.g. a sleep that a stop request interrupts).
    """

    def __init__(self, what: str, on_state: Callable[[bool], None],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.what, self.on_state, self.sleep, self.failures = what, on_state, sleep, 0

    def delay_s(self) -> float:
        return LOOP_BACKOFF.delay_s(self.failures)

    async def wait(self, err: BaseException) -> None:
        """Record a failure and wait before the retry."""
        self.failures += 1
        self.on_state(False)
        delay = self.delay_s()
        # The first failure and every 50th are warnings; the rest would flood the log.
        lvl = logging.WARNING if self.failures in (1, 10) or self.failures % 50 == 0 else logging.DEBUG
        log.log(lvl, "%s failed (%d in a row), retrying in %.2fs: %s", self.what, self.failures, delay, err)
        await self.sleep(delay)

    def ok(self) -> None:
        """Record a success."""
        self.failures = 0
        self.on_state(True)


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> None:
    """Wait for ``event`` at most ``timeout_s`` (None: forever). Unlike ``asyncio.wait_for``
    on Python 3.11, never loses a cancellation that races the event (CPython gh-86296)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
