"""Which partitions of a partitioned model failed lately, for
:class:`~headrace.workers.broker.partitioned.PartitionedBroker`'s reads and claims.

A partition whose Redis Cluster master is down fails its reads; the others keep serving
(with ``cluster-require-full-coverage no``). Its failure is remembered for
:data:`DOWN_RETRY_S` so the sequential read and claim rounds leave it out meanwhile:
redis-py's cluster client spends seconds of its own retries before a command to a dead node
fails, and every round that asked it would stall the healthy partitions that long. Its
blocking read (concurrent with the others') still asks it, and an answer there brings it
back at once.
"""

from __future__ import annotations

import logging
import time

from headrace.client import errors as E

log = logging.getLogger(__name__)

#: seconds a failed partition is left out of the sequential read and claim rounds.
DOWN_RETRY_S = 1.0
#: seconds between two warnings that a partition failed while others served.
WARN_EVERY_S = 10.0


class PartitionHealth:
    """Failed partitions and when to ask them again (monotonic seconds)."""

    def __init__(self) -> None:
        self._retry_at: dict[int, float] = {}
        self._warned_s = -WARN_EVERY_S

    def failed(self, partition: int) -> None:
        self._retry_at[partition] = time.monotonic() + DOWN_RETRY_S

    def answered(self, partition: int) -> None:
        self._retry_at.pop(partition, None)

    def to_ask(self, order: list[int]) -> list[int]:
        """The partitions of ``order`` to ask now: those not failed lately, or all of them
        when every one has (the caller's error then shows the outage)."""
        now = time.monotonic()
        return [p for p in order if self._retry_at.get(p, 0.0) <= now] or order

    def settle(self, asked: int, errors: list[E.BrokerError]) -> None:
        """End a round over ``asked`` partitions that met ``errors``: raise the last one when
        every partition asked failed, else log it (:meth:`warn`)."""
        if errors and len(errors) >= asked:
            raise errors[-1]
        if errors:
            self.warn(errors[-1])

    def warn(self, error: E.BrokerError) -> None:
        """Log that a partition failed while the others served, once per :data:`WARN_EVERY_S`
        (reads repeat all the time)."""
        if time.monotonic() - self._warned_s >= WARN_EVERY_S:
            self._warned_s = time.monotonic()
            log.warning("a partition failed; the worker serves what the others deliver: %s", error)
