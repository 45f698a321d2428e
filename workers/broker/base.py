"""The worker's view of the queue: the :class:`Broker` interface.

One broker instance serves one consumer of one model's request stream. The worker loop
only talks to a broker; :class:`~headrace.workers.broker.redis_broker.RedisBroker`
implements it on Redis Streams and :class:`~headrace.workers.testing.memory_broker.MemoryBroker`
in memory, and ``tests/integration/test_broker_contract.py`` runs the same scenarios against both.
Every method raises :class:`~headrace.client.errors.BrokerError` when the queue cannot be
reached (so the loop can back off and retry); a commit the queue refuses for its content
raises :class:`CommitRejected`.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from headrace.client import errors as E
from headrace.workers.broker.backlog import Backlog
from headrace.workers.broker.inbox import RelayStep
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.ops import Op
from headrace.workers.pipeline.stats import BatchStats

__all__ = ["Backlog", "Broker", "CommitRejected", "RelayStep"]


class CommitRejected(E.BrokerError):
    """The queue refused a commit for what it holds (a script error on one of its ops),
    not for being unreachable: retrying the same ops fails the same way."""


class Broker(abc.ABC):
    """One consumer's access to one model's request stream. See module doc.

    Attributes:
        consumer: this consumer's name in the group.
        max_entry_bytes: entries larger than this (all fields counted) are returned
            truncated (:attr:`Entry.truncated`): their payload never leaves the queue.
        default_budget_bytes: the byte budget of a read or claim that names none.
    """

    consumer: str
    max_entry_bytes: int
    default_budget_bytes: int

    @abc.abstractmethod
    async def ensure_group(self) -> None:
        """Create the consumer group at id 0 (serving entries added before any worker)."""

    @abc.abstractmethod
    async def read(self, count: int, block_ms: int, budget_bytes: int | None = None) -> list[Entry]:
        """New entries for this consumer (oldest first), waiting up to ``block_ms`` for one.

        At most ``count`` entries; those returned whole total at most ``budget_bytes``
        (None: :attr:`default_budget_bytes`; the first one always fits when it is not
        oversize). An oversize entry comes alone
        and truncated. A read that had to wait returns at most one entry.
        """

    async def read_ready(self, count: int, budget_bytes: int | None = None) -> list[Entry]:
        """Like :meth:`read`, without waiting: the entries there already (none when none
        is). Readers of several streams use it to visit each without blocking on one."""
        return await self.read(count, 1, budget_bytes)

    @abc.abstractmethod
    async def claim_abandoned(self, min_idle_ms: int, count: int, budget_bytes: int | None = None) -> list[Entry]:
        """Take over entries pending longer than ``min_idle_ms`` (any consumer, this one
        included), with their delivery counts; sized like :meth:`read`."""

    @abc.abstractmethod
    async def refresh_lease(self, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of the given entries this consumer still owns; returns
        those it still owns (the others were claimed by someone else)."""

    @abc.abstractmethod
    async def release(self, entries: Sequence[Entry], idle_ms: int) -> list[str]:
        """Hand back entries this consumer holds but never ran: each becomes claimable at
        once (idle ``idle_ms``) with its delivery count as before this consumer got it.
        Returns the ids handed back (entries claimed by someone else are left alone)."""

    @abc.abstractmethod
    async def answered(self, request_ids: Sequence[str]) -> list[bool]:
        """Whether each request id has a dedupe marker (was answered)."""

    async def cancel_marks(self, request_ids: Sequence[str]) -> list[int]:
        """Per request id, the time (Unix ms) up to which its submissions were cancelled
        (its cancel marker, ``ModelKeys.cancel``), 0 when none. A broker without cancel
        markers runs everything."""
        return [0] * len(request_ids)

    async def prechecks(self, request_ids: Sequence[str]) -> tuple[list[bool], list[int]]:
        """``(answered(ids), cancel_marks(ids))``, what admission asks before it runs newly
        read entries. A broker that can ask both in one round trip overrides this.

        Raises:
            BrokerError: either could not be asked.
        """
        done, marks = await asyncio.gather(self.answered(request_ids), self.cancel_marks(request_ids))
        return done, marks

    @abc.abstractmethod
    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        """Apply ops atomically (results, dead letters, acks); one outcome per op
        (``WRITTEN``, ``DUPLICATE``, ``UNWRITABLE`` of :mod:`headrace.workers.pipeline.ops`).
        Also appends the ``stats`` lines (not atomically: they are informational).

        Raises:
            CommitRejected: the queue refused the ops (nothing was applied).
            BrokerError: the queue is unreachable (nothing was applied, or all was).
        """

    @abc.abstractmethod
    async def relay(self, count: int) -> RelayStep:
        """Move up to ``count`` of the oldest inbox elements into the request stream in one
        atomic step (server-picked ids, no trimming); elements that break the entry bounds
        are dead-lettered as a description without their payload (see
        :mod:`headrace.workers.broker.inbox`)."""

    @abc.abstractmethod
    async def wait_inbox(self, block_ms: int) -> bool:
        """Wait up to ``block_ms`` until the inbox holds an element, without taking it;
        True when it does."""

    async def wait_and_relay(self, count: int, block_ms: int) -> RelayStep:
        """:meth:`wait_inbox`, then (when it found an element) one :meth:`relay` step: what
        a relay does when the inbox was empty. A broker that can run the two in one round
        trip overrides it; the step is the same.

        Raises:
            BrokerError: the queue is unreachable or refused the relay (as :meth:`relay`).
        """
        if not await self.wait_inbox(block_ms):
            return RelayStep(0, 0, 0)
        return await self.relay(count)

    @abc.abstractmethod
    async def publish_samples_per_entry(self, value: float) -> None:
        """Publish how many samples the entries of this model carry lately (a moving
        average, >= 1) as ``samples_per_entry`` in its limits hash: the submit function
        counts the backlog in samples with it.

        Raises:
            BrokerError: Redis failed.
        """

    @abc.abstractmethod
    async def trim(self) -> int:
        """Remove entries every group has acknowledged; returns how many."""

    @abc.abstractmethod
    async def backlog(self) -> Backlog:
        """Current lag and pending count of the group."""

    @abc.abstractmethod
    async def heartbeat(self, worker: Mapping[str, Any], describe: Mapping[str, Any] | None = None,
                        stale_ms: int = 30_000) -> None:
        """Register this worker in ``<ns>:models`` (format: :mod:`headrace.client.registry`).

        Args:
            worker: flat JSON-able facts of this worker (``version``, ``backend``, batching
                limits, ``host``, ``pid``); ``seen_ms`` is set from the broker's clock.
            describe: the servable's description, stored per version (None keeps it).
            stale_ms: drop other workers whose last heartbeat is older than this.
        """

    @abc.abstractmethod
    async def unregister(self) -> None:
        """Remove this worker from ``<ns>:models``."""

    @abc.abstractmethod
    async def delete_idle_consumers(self, min_idle_ms: int, only: str | None = None) -> list[str]:
        """Delete consumers with no pending entries idle at least ``min_idle_ms``."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise BrokerError unless the broker answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. Idempotent."""
