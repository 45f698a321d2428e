"""The writer task: commits what the other tasks answered, one atomic script per merge.

Units queue up while a commit runs; the next commit merges them (up to
:data:`MAX_COMMIT_OPS` ops). A commit that cannot reach Redis is retried with backoff. A
commit Redis refuses for its content (:class:`~headrace.workers.broker.base.CommitRejected`)
is split in halves until the refused op is alone; that op's entry is then dead-lettered
with only its routing fields, or, when even that is refused, let go to be redelivered after
the lease. One entry never blocks the others' answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final

from headrace.client import errors as E
from headrace.client.protocol import now_ms
from headrace.workers.broker.base import CommitRejected
from headrace.workers.engine.state import Shared
from headrace.workers.pipeline.ops import Ack, DeadLetterOp, Op, Reply
from headrace.workers.pipeline.stats import BatchStats
from headrace.workers.pipeline.work import Unit

log = logging.getLogger(__name__)

MAX_COMMIT_OPS: Final = 4096  # ops merged into one commit script call
#: outcome of an op whose commit Redis refused even as a bare dead letter (entry let go).
REFUSED: Final = -2


def fallback_op(op: Op, err: Exception) -> DeadLetterOp:
    """A dead letter for an op Redis refused: the routing fields only, no reply."""
    fields: dict[bytes, bytes] = {}
    if isinstance(op, (Reply, DeadLetterOp)) and op.request_id:
        fields[b"id"] = op.request_id.encode()
    if isinstance(op, (Reply, DeadLetterOp)) and op.reply_to:
        fields[b"reply_to"] = op.reply_to[:512].encode()
    deliveries = op.deliveries if isinstance(op, DeadLetterOp) else 0
    return DeadLetterOp(op.entry_id, fields, f"its answer could not be committed: {err}", E.INTERNAL_ERROR, deliveries)


class Writer:
    """The writer task of one worker (see module doc).

    Args:
        shared: the worker's shared state (commit queue, broker, in-flight entries).
        consumer: this worker's name (stats lines).
        committed: called with the ops applied and their outcomes (after each commit).
    """

    def __init__(self, shared: Shared, consumer: str,
                 committed: Callable[[Sequence[Op], Sequence[Unit], Sequence[int]], None]) -> None:
        self.shared, self.consumer, self.committed = shared, consumer, committed

    async def run(self) -> None:
        """Commit until a ``None`` arrives in the queue (the drain's end) or shutdown."""
        last = False
        while not last:
            first = await self.shared.commits.get()
            if first is None:
                return
            units, last = self._merge(first)
            ops = [op for u in units for op in u.ops]
            self.shared.in_flight.committing.update(op.entry_id for op in ops)
            try:
                applied, outcomes = await self._commit(ops, self._stats(units))
            finally:
                self.shared.in_flight.committing.clear()
            if applied is None:
                return  # shutdown while Redis is unreachable
            self.committed(applied, units, outcomes)

    def _merge(self, first: Unit) -> tuple[list[Unit], bool]:
        units, n_ops = [first], len(first.ops)
        queue = self.shared.commits
        while not queue.empty() and n_ops < MAX_COMMIT_OPS:
            nxt = queue.get_nowait()
            if nxt is None:
                return units, True
            units.append(nxt)
            n_ops += len(nxt.ops)
        return units, False

    def _stats(self, units: Sequence[Unit]) -> list[BatchStats]:
        at = now_ms()
        lines = []
        for u in units:
            try:
                lines.append(u.stats_line(self.consumer, at))
            except Exception:  # noqa: BLE001 - stats are informational; the answers must still go
                log.exception("stats line of a batch could not be built")
        return lines

    async def _commit(self, ops: list[Op], stats: list[BatchStats]) -> tuple[list[Op] | None, list[int]]:
        """Commit ``ops``, retrying while Redis is unreachable and splitting a refused
        commit. Returns the ops applied (fallbacks in place of refused ones) and their
        outcomes; ``(None, [])`` when shutdown came first."""
        backoff = self.shared.control.backoff("commit", wake_on_stop=False)
        while True:
            try:
                outcomes = await self.shared.broker.commit(ops, stats)
                backoff.ok()
                return ops, outcomes
            except CommitRejected as e:
                backoff.ok()
                return await self._split(ops, e)
            except E.BrokerError as e:
                if self.shared.control.shutdown:
                    log.warning("giving up on writing %d results at shutdown; their entries stay pending and are "
                                "redelivered after the lease", len(ops))
                    return None, []
                await backoff.wait(e)

    async def _split(self, ops: list[Op], err: CommitRejected) -> tuple[list[Op] | None, list[int]]:
        if len(ops) == 1:
            return await self._refused(ops[0], err)
        log.warning("commit of %d ops refused (%s); splitting it to isolate the op", len(ops), err)
        half = len(ops) // 2
        applied: list[Op] = []
        outcomes: list[int] = []
        for part in (ops[:half], ops[half:]):
            done, out = await self._commit(part, [])
            if done is None:
                return None, []
            applied += done
            outcomes += out
        return applied, outcomes

    async def _refused(self, op: Op, err: CommitRejected) -> tuple[list[Op] | None, list[int]]:
        log.error("Redis refused the answer of entry %s (%s); dead-lettering it bare", op.entry_id, err)
        self.shared.counters["commit_refused"] += 1
        if isinstance(op, Ack):
            return [op], [REFUSED]
        bare = fallback_op(op, err)
        backoff = self.shared.control.backoff("commit", wake_on_stop=False)
        while True:
            try:
                return [bare], await self.shared.broker.commit([bare])
            except CommitRejected as e:
                log.error("Redis refused even the bare dead letter of entry %s (%s); it is redelivered after the "
                          "lease", op.entry_id, e)
                return [op], [REFUSED]
            except E.BrokerError as e:
                if self.shared.control.shutdown:
                    return None, []
                await backoff.wait(e)
