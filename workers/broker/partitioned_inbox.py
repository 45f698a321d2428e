"""Strict submit mode's inbox side of a partitioned model: one relay step and one blocking
wait over every partition's inbox (each in its partition's slot), for
:class:`~headrace.workers.broker.partitioned.PartitionedBroker`.

A partition whose master is down is skipped or left out of the wait while the others go on
(:mod:`~headrace.workers.broker.partition_health`); that error is raised only when every
partition asked failed. An error Redis answers (a key of another type) is raised at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from headrace.client import errors as E
from headrace.client.failures import unreachable
from headrace.workers.broker.base import Broker, RelayStep
from headrace.workers.broker.partition_health import PartitionHealth

# An inbox wait that ends this close to its caller's deadline has used up the time asked for;
# waiting again would only add a round trip for a millisecond.
_WAIT_SLACK_S = 0.002


class PartitionedInbox:
    """The inbox calls over ``parts`` (index = partition), sharing ``health`` with reads.

    Waits still running when a call returns are kept and reused by the next call, so no
    connection is torn down by a cancel; :meth:`close` cancels them.
    """

    def __init__(self, parts: Sequence[Broker], health: PartitionHealth) -> None:
        self.parts = list(parts)
        self.health = health
        self._waits: dict[int, asyncio.Task[bool]] = {}

    async def relay(self, count: int) -> RelayStep:
        """One ``headrace_relay`` step of up to ``count`` elements per partition (each inbox
        is in its partition's slot); the step's figures add up over the partitions.

        A partition that cannot be reached (its master down) is skipped like in reads, so
        the others' inboxes keep moving; that BrokerError is raised only when every
        partition asked failed, one Redis answered with (a refusal) at once. Each step is
        atomic on its partition: what the others moved stays moved."""
        added = dead = left = 0
        asked = self.health.to_ask(list(range(len(self.parts))))
        failed: list[E.BrokerError] = []
        for p in asked:
            try:
                step = await self.parts[p].relay(count)
            except E.BrokerError as e:
                if not unreachable(e):
                    raise
                failed.append(e)
                self.health.failed(p)
                continue
            self.health.answered(p)
            added, dead, left = added + step.added, dead + step.dead_lettered, left + step.left
        self.health.settle(len(asked), failed)
        return RelayStep(added, dead, left)

    async def wait_inbox(self, block_ms: int) -> bool:
        """Wait on every partition's inbox at once (one blocking wait each: their keys are
        in different slots). Waits still running when the first one returns keep running
        and are reused by the next call, so no connection is torn down by a cancel.

        A reused wait may have been asked for a shorter time than this call: its "nothing
        came" ends only that partition's wait, which is started again for the rest of
        ``block_ms``; only an empty wait that reaches this call's own deadline answers False.
        A partition whose wait fails (its master down) is left out for the rest of the call
        while the others wait on; the BrokerError is raised only when every one failed.
        """
        deadline = time.monotonic() + block_ms / 1000.0
        failed: dict[int, E.BrokerError] = {}  # not waited on again in this call
        while True:
            left_ms = max(1, int((deadline - time.monotonic()) * 1000.0))
            for p, part in enumerate(self.parts):
                if p not in self._waits and p not in failed:
                    self._waits[p] = asyncio.ensure_future(part.wait_inbox(left_ms))
            if not self._waits:
                raise next(iter(failed.values()))  # every partition's wait failed
            await asyncio.wait(list(self._waits.values()), timeout=left_ms / 1000.0 + 0.5,
                               return_when=asyncio.FIRST_COMPLETED)
            found, now_failed = self._done()
            refused = [e for e in now_failed.values() if not unreachable(e)]
            if refused:
                raise refused[0]
            failed.update(now_failed)
            if found:
                return True
            if deadline - time.monotonic() < _WAIT_SLACK_S:
                if failed:  # the others waited their time; the failed ones are asked next call
                    self.health.warn(next(iter(failed.values())))
                return False

    def _done(self) -> tuple[bool, dict[int, E.BrokerError]]:
        """Collect the finished inbox waits: whether one found an element, and the broker
        errors of those that failed, by partition (any other exception is raised); each
        outcome is told to the shared :class:`PartitionHealth`."""
        found, failed = False, {}
        for p, task in list(self._waits.items()):
            if not task.done():
                continue
            del self._waits[p]
            exc = task.exception()
            if exc is None:
                found = found or bool(task.result())
                self.health.answered(p)
            elif isinstance(exc, E.BrokerError):
                failed[p] = exc
                if unreachable(exc):  # the relay step and reads leave it out for a while too
                    self.health.failed(p)
            else:
                raise exc
        return found, failed

    async def close(self) -> None:
        """Cancel the waits still running (a wait only rotates the inbox: nothing to hand back)."""
        waits = list(self._waits.values())
        self._waits.clear()
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
