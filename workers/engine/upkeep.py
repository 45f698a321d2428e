"""The upkeep tasks of a worker: lease refresh and maintenance.

* lease: every ``lease_s / 3`` refreshes the idle time of every entry held, so a batch that
  outlives the lease is not stolen and run twice; an entry another worker claimed meanwhile
  is let go.
* maintenance: heartbeat in ``<ns>:models``, backlog metrics, trimming, idle-consumer cleanup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Final

from headrace.client import errors as E
from headrace.workers.backends.base import call_cap
from headrace.workers.engine.state import Shared
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

HEARTBEAT_S: Final = 2.0
STALE_MS: Final = int(max(30.0, 5 * HEARTBEAT_S) * 1000)  # other workers silent this long are dropped


def consumer_idle_delete_ms(settings: WorkerSettings) -> int:
    """Idle time after which a consumer with nothing pending is deleted from the group:
    well beyond any live worker's gap between two reads."""
    return int(max(60.0, 10 * settings.lease_s, 5 * settings.block_ms / 1000.0) * 1000)


class Upkeep:
    """The lease and maintenance tasks of one worker (see module doc)."""

    def __init__(self, shared: Shared, consumer: str) -> None:
        self.shared, self.consumer = shared, consumer
        #: the model's own largest call (0 = none): the registry's max_batch is the smaller one.
        self._cap = call_cap(shared.servable)

    async def lease_loop(self) -> None:
        s = self.shared
        backoff = s.control.backoff("lease refresh")
        while not s.control.shutdown:
            await asyncio.sleep(s.settings.lease_s / 3)
            ids = list(s.in_flight)
            if not ids:
                continue
            try:
                owned = set(await s.broker.refresh_lease(ids))
                backoff.ok()
            except E.BrokerError as e:
                await backoff.wait(e)
                continue
            for lost in (i for i in ids if i not in owned and i in s.in_flight and i not in s.in_flight.committing):
                # Claimed by another worker (we were stalled past the lease); its answer or
                # ours wins the dedupe marker, so stop renewing it.
                log.warning("lease lost on entry %s; another worker owns it now", lost)
                s.in_flight.pop(lost)
                s.counters["leases_lost"] += 1

    def registry_facts(self) -> dict[str, Any]:
        """This worker's entry in the model registry (read by ``headrace.client.registry``):
        also the backlog it last read and the p50/p99 submit-to-result latency (ms) of the
        requests it answered lately (``client.model_status``)."""
        s = self.shared
        recent = sorted(s.recent_ms)
        p50 = recent[len(recent) // 2] if recent else 0.0
        p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))] if recent else 0.0
        return {"version": s.servable.version, "backend": type(s.servable).__name__,
                "max_batch": min(s.settings.max_batch, self._cap or s.settings.max_batch),
                "preferred_batch": s.settings.preferred_batch,
                "max_wait_ms": s.settings.max_wait_ms, "host": socket.gethostname(), "pid": os.getpid(),
                "lag": s.backlog[0], "pending": s.backlog[1], "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}

    async def heartbeat_once(self) -> None:
        """Register the worker now (a started worker is registered: SDK submit checks pass at
        once); a failure is only logged, the maintenance task retries."""
        try:
            await self.shared.broker.heartbeat(self.registry_facts(), self._describe(), stale_ms=STALE_MS)
        except E.BrokerError as e:
            log.warning("first registry heartbeat failed (%s); the maintenance loop retries", e)

    def _describe(self) -> dict[str, Any] | None:
        try:
            return self.shared.servable.describe()
        except Exception:  # noqa: BLE001 - the description is informational only
            log.exception("servable description failed; registering without it")
            return None

    async def maintenance_loop(self) -> None:
        s = self.shared
        backoff = s.control.backoff("maintenance")
        next_trim = time.monotonic()
        describe = self._describe()
        while not s.control.shutdown:
            try:
                await s.broker.heartbeat(self.registry_facts(), describe, stale_ms=STALE_MS)
                bl = await s.broker.backlog()
                s.backlog = (bl.lag, bl.pending)
                await s.broker.publish_samples_per_entry(s.samples_per_entry)
                s.metrics.set_backlog(bl.lag, bl.pending)
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + s.settings.trim_interval_s
                    await self._trim()
                backoff.ok()
            except E.BrokerError as e:
                await backoff.wait(e)
                continue
            await asyncio.sleep(min(HEARTBEAT_S, s.settings.trim_interval_s))

    async def _trim(self) -> None:
        s = self.shared
        s.counters["trimmed"] += await s.broker.trim()
        gone = await s.broker.delete_idle_consumers(consumer_idle_delete_ms(s.settings))
        if gone:
            log.info("deleted idle consumers with nothing pending: %s", gone)
