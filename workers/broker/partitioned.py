"""One consumer of a model split into ``P`` partitions (docs/scaling.md section 4): the
:class:`~headrace.workers.broker.base.Broker` interface over one broker per partition.

Each partition is its own request stream with its own hash tag (``{<model>~<p>}``), hence
its own Redis Cluster slot, and a cluster refuses one command over several slots
(``CROSSSLOT``). So nothing here ever sends a command over two partitions:

* **reads** visit the partitions in turn without waiting (each a sized ``READ`` script),
  starting one further each time, so a busy partition never starves the others; only when
  all are empty does the read wait, with one blocking ``XREADGROUP COUNT 1`` per
  partition at once (each broker has its own connections). The first that brings an entry
  ends the wait; the others keep waiting in the background and what they bring is handed
  out by the next reads (never lost: on :meth:`close` it is handed back, claimable at once);
* **entry ids** carry their partition (``<p>/<stream id>``), so acks, lease refreshes,
  hand-backs and dead letters go to the partition the entry came from, grouped per
  partition; the dead-letter record keeps the plain stream id;
* **dedupe and cancel checks** go to the partition the request id maps to
  (``crc32(request_id) % P``, where producers put it); the commit script checks the marker
  again atomically in the entry's own partition, so a request a foreign producer put
  elsewhere is still answered at most once;
* the **registry** heartbeat is the model's (one per worker), backlog and trims add up;
* a partition whose **master is down** (a cluster with ``cluster-require-full-coverage no``)
  is skipped: reads, claims and the inbox (strict mode, :mod:`.partitioned_inbox`) hand
  over what the others bring and raise only when every partition failed
  (:mod:`.partition_health`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from headrace.client import errors as E
from headrace.client.failures import unreachable
from headrace.client.keys import partition_keys, partition_of
from headrace.workers.broker.backlog import Backlog
from headrace.workers.broker.base import Broker, RelayStep
from headrace.workers.broker.partition_health import PartitionHealth
from headrace.workers.broker.partition_ids import by_partition, rewrap, unwrap, wrap
from headrace.workers.broker.partitioned_inbox import PartitionedInbox
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.ops import Op
from headrace.workers.pipeline.stats import BatchStats
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class PartitionedBroker(Broker):
    """:class:`Broker` over ``parts`` (one broker per partition, index = partition number).
    See module doc.

    Args:
        parts: the partitions' brokers, all of one consumer name.
        release_idle_ms: the idle time entries handed back on :meth:`close` get (so others
            claim them at once).
        route: the partition of a request id (None: ``crc32(request_id) % P``, what the
            SDK uses; another producer's rule may be given here).
    """

    def __init__(self, parts: Sequence[Broker], release_idle_ms: int = 30_000,
                 route: Callable[[str], int] | None = None) -> None:
        if not parts:
            raise E.ConfigError("a partitioned broker needs at least one partition")
        self.parts = list(parts)
        self.consumer = parts[0].consumer
        self.max_entry_bytes = parts[0].max_entry_bytes
        self.default_budget_bytes = parts[0].default_budget_bytes
        self.release_idle_ms = release_idle_ms
        self._health = PartitionHealth()
        self._route = route
        self._next = 0  # the partition the next read starts from
        self._waits: dict[int, asyncio.Task[list[Entry]]] = {}
        self._ready: list[Entry] = []  # brought in by waits, not yet handed out (wrapped ids)
        self._inbox = PartitionedInbox(self.parts, self._health)

    @property
    def partitions(self) -> int:
        return len(self.parts)

    def _order(self) -> list[int]:
        start, self._next = self._next, (self._next + 1) % len(self.parts)
        return [(start + i) % len(self.parts) for i in range(len(self.parts))]

    def _of(self, request_id: str) -> int:
        return self._route(request_id) if self._route is not None else partition_of(request_id, len(self.parts))

    async def ensure_group(self) -> None:
        """Create every partition's group (and its submit function and limits).

        A partition that cannot be reached now (its master down) is left out, so the worker
        serves the others from the start; its first read once the master is back meets
        ``NOGROUP`` and creates the group then (``RedisConnection._call``).

        Raises:
            BrokerError: every partition failed (the last one's error), or Redis refused
                one (at once).
        """
        failed: list[E.BrokerError] = []
        for p, part in enumerate(self.parts):
            try:
                await part.ensure_group()
            except E.BrokerError as e:
                if not unreachable(e):
                    raise
                failed.append(e)
                self._health.failed(p)
                continue
            self._health.answered(p)
        self._health.settle(len(self.parts), failed)

    # --- reading -------------------------------------------------------------------------

    def _take_ready(self, count: int, budget: int) -> list[Entry]:
        out: list[Entry] = []
        while self._ready and len(out) < count:
            size = 0 if self._ready[0].truncated else self._ready[0].size_bytes
            if out and (size > budget or self._ready[0].truncated):
                break
            out.append(self._ready.pop(0))
            budget -= size
            if out[-1].truncated:
                break
        return out

    async def _visit(self, fetch: Callable[[Broker, int, int], Any], count: int, budget: int) -> list[Entry]:
        """Ask each partition in turn (``fetch(part, count_left, budget_left)``) until
        ``count`` entries or the budget are reached; an oversize entry ends the round.

        A partition that fails (its master down) is skipped: what the others delivered is
        returned, since it is pending on this consumer already and dropping it would have it
        redelivered after the lease, again and again, until dead-lettered as if it were
        poison. For a while it is then left out of these rounds
        (:mod:`~headrace.workers.broker.partition_health`). Raises a BrokerError only when
        every partition asked failed."""
        out: list[Entry] = []
        errors: list[E.BrokerError] = []
        asked = 0
        for p in self._health.to_ask(self._order()):
            asked += 1
            try:
                fetched = await fetch(self.parts[p], count - len(out), budget)
            except E.BrokerError as e:
                errors.append(e)
                self._health.failed(p)
                continue
            self._health.answered(p)
            got = [rewrap(p, e) for e in fetched]
            if out and any(e.truncated for e in got):
                self._ready[:0] = got  # an oversize entry comes alone: the next read hands it out
                break
            out += got
            budget -= sum(0 if e.truncated else e.size_bytes for e in got)
            if len(out) >= count or budget <= 0 or any(e.truncated for e in got):
                break
        self._health.settle(asked, errors)
        return out

    async def read(self, count: int, block_ms: int, budget_bytes: int | None = None) -> list[Entry]:
        budget = self.default_budget_bytes if budget_bytes is None else int(budget_bytes)
        ready = self._take_ready(count, budget) or await self.read_ready(count, budget)
        if ready:
            return ready
        return await self._wait(block_ms, budget)

    async def read_ready(self, count: int, budget_bytes: int | None = None) -> list[Entry]:
        budget = self.default_budget_bytes if budget_bytes is None else int(budget_bytes)
        self._harvest()
        ready = self._take_ready(count, budget)
        if ready:
            return ready

        async def fetch(part: Broker, n: int, left: int) -> list[Entry]:
            return await part.read_ready(n, left)

        return await self._visit(fetch, count, budget)

    async def _wait(self, block_ms: int, budget: int) -> list[Entry]:
        """Wait up to ``block_ms`` for an entry on any partition (see module doc).

        A partition whose wait fails (its master down) does not end the wait of the others:
        entries arriving on them meanwhile are taken at once, instead of after the read
        loop's backoff. Raises the BrokerError only when every partition failed."""
        for p, part in enumerate(self.parts):
            if p not in self._waits:
                self._waits[p] = asyncio.ensure_future(part.read(1, block_ms, budget))
        give_up = time.monotonic() + block_ms / 1000.0 + 0.5
        failed: dict[int, E.BrokerError] = {}
        while True:
            await asyncio.wait(list(self._waits.values()), timeout=max(0.0, give_up - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            failed.update(self._harvest())
            ready = self._take_ready(1, budget)
            if ready or not failed or not self._waits or time.monotonic() >= give_up:
                break
        if not ready:
            self._health.settle(len(self.parts), list(failed.values()))
        return ready

    def _harvest(self) -> dict[int, E.BrokerError]:
        """Move what finished waits brought into ``_ready``; the errors they met, by partition."""
        failed: dict[int, E.BrokerError] = {}
        for p, task in list(self._waits.items()):
            if not task.done():
                continue
            del self._waits[p]
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is None:
                self._ready += [rewrap(p, e) for e in task.result()]
                self._health.answered(p)
                continue
            failed[p] = exc if isinstance(exc, E.BrokerError) else E.BrokerError(f"reading partition {p} failed: {exc!r}")
            self._health.failed(p)
        return failed

    async def claim_abandoned(self, min_idle_ms: int, count: int, budget_bytes: int | None = None) -> list[Entry]:
        budget = self.default_budget_bytes if budget_bytes is None else int(budget_bytes)

        async def fetch(part: Broker, n: int, left: int) -> list[Entry]:
            return await part.claim_abandoned(min_idle_ms, n, left)

        return await self._visit(fetch, count, budget)

    # --- per-entry operations, grouped by partition ------------------------------------------

    async def refresh_lease(self, entry_ids: Sequence[str]) -> list[str]:
        owned: list[str] = []
        for p, ids in by_partition(entry_ids).items():
            owned += [wrap(p, i) for i in await self.parts[p].refresh_lease(ids)]
        return owned

    async def release(self, entries: Sequence[Entry], idle_ms: int) -> list[str]:
        groups: dict[int, list[Entry]] = {}
        for e in entries:
            p, sid = unwrap(e.entry_id)
            groups.setdefault(p, []).append(dataclasses.replace(e, entry_id=sid))
        out: list[str] = []
        for p, group in groups.items():
            out += [wrap(p, i) for i in await self.parts[p].release(group, idle_ms)]
        return out

    async def _by_request(self, request_ids: Sequence[str], ask: Callable[[Broker, list[str]], Any]) -> list[T]:
        groups: dict[int, list[int]] = {}
        for i, rid in enumerate(request_ids):
            groups.setdefault(self._of(rid), []).append(i)
        out: list[Any] = [None] * len(request_ids)
        for p, idx in groups.items():
            for i, value in zip(idx, await ask(self.parts[p], [request_ids[i] for i in idx]), strict=True):
                out[i] = value
        return out

    async def answered(self, request_ids: Sequence[str]) -> list[bool]:
        async def ask(part: Broker, rids: list[str]) -> list[bool]:
            return await part.answered(rids)

        return await self._by_request(request_ids, ask)

    async def cancel_marks(self, request_ids: Sequence[str]) -> list[int]:
        async def ask(part: Broker, rids: list[str]) -> list[int]:
            return await part.cancel_marks(rids)

        return await self._by_request(request_ids, ask)

    async def prechecks(self, request_ids: Sequence[str]) -> tuple[list[bool], list[int]]:
        groups: dict[int, list[int]] = {}
        for i, rid in enumerate(request_ids):
            groups.setdefault(self._of(rid), []).append(i)
        done: list[bool] = [False] * len(request_ids)
        marks: list[int] = [0] * len(request_ids)
        asked = await asyncio.gather(*(self.parts[p].prechecks([request_ids[i] for i in idx])
                                       for p, idx in groups.items()))
        for idx, (d, m) in zip(groups.values(), asked, strict=True):
            for k, i in enumerate(idx):
                done[i], marks[i] = d[k], m[k]
        return done, marks

    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        """Each partition's ops in one commit of its own (atomic per partition, in
        parallel); the stats lines go to partition 0's stats stream.

        Raises:
            CommitRejected: a partition refused its ops (the others' were applied; their
                dedupe markers make committing them again a no-op).
            BrokerError: a partition is unreachable.
        """
        groups: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            groups.setdefault(unwrap(op.entry_id)[0], []).append(i)
        if stats and 0 not in groups:
            groups[0] = []  # the stats lines go to partition 0's stats stream (headrace status reads it)
        calls = []
        for p, idx in groups.items():
            inner = [dataclasses.replace(ops[i], entry_id=unwrap(ops[i].entry_id)[1]) for i in idx]
            calls.append(self.parts[p].commit(inner, stats if p == 0 else ()))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for res in outcomes:
            if isinstance(res, BaseException):
                raise res
        out = [0] * len(ops)
        for idx, res in zip(groups.values(), outcomes, strict=True):
            for i, value in zip(idx, res, strict=True):  # type: ignore[arg-type]
                out[i] = value
        return out

    # --- the model as a whole ----------------------------------------------------------------

    async def relay(self, count: int) -> RelayStep:
        return await self._inbox.relay(count)

    async def wait_inbox(self, block_ms: int) -> bool:
        return await self._inbox.wait_inbox(block_ms)

    async def publish_samples_per_entry(self, value: float) -> None:
        """Published on every partition: each partition's submit function reads its own
        limits hash."""
        for part in self.parts:
            await part.publish_samples_per_entry(value)

    async def trim(self) -> int:
        return sum([await part.trim() for part in self.parts])

    async def backlog(self) -> Backlog:
        each = [await part.backlog() for part in self.parts]
        return Backlog(sum(b.lag for b in each), sum(b.pending for b in each))

    async def heartbeat(self, worker: Mapping[str, Any], describe: Mapping[str, Any] | None = None,
                        stale_ms: int = 30_000) -> None:
        await self.parts[0].heartbeat({**worker, "partitions": len(self.parts)}, describe, stale_ms)

    async def unregister(self) -> None:
        await self.parts[0].unregister()

    async def delete_idle_consumers(self, min_idle_ms: int, only: str | None = None) -> list[str]:
        # Each partition's group deletes the consumers that own nothing there (a consumer
        # that never read a partition is not in its group at all): the names deleted somewhere.
        deleted: set[str] = set()
        for part in self.parts:
            deleted.update(await part.delete_idle_consumers(min_idle_ms, only))
        return sorted(deleted)

    async def ping(self) -> None:
        for part in self.parts:
            await part.ping()

    async def close(self) -> None:
        """Let running waits end (at most ``block_ms``), hand back every entry they brought
        that was never handed out, then close the partitions' brokers."""
        if self._waits:
            await asyncio.wait(list(self._waits.values()), timeout=60.0)
            for task in self._waits.values():
                task.cancel()
        self._harvest()
        self._waits.clear()
        await self._inbox.close()
        unread, self._ready = self._ready, []
        if unread:
            try:
                await self.release(unread, self.release_idle_ms)
            except E.BrokerError as e:
                log.warning("could not hand back %d entries read but never run (%s); others claim them after "
                            "their lease", len(unread), e)
        for part in self.parts:
            await part.close()


def redis_broker(settings: WorkerSettings) -> Broker:
    """The worker's broker for ``settings``: a :class:`RedisBroker` on the model's stream
    when ``partitions`` is 1, else a :class:`PartitionedBroker` over one per partition."""
    from headrace.workers.broker.redis_broker import RedisBroker

    if settings.partitions == 1:
        return RedisBroker(settings)
    parts = [RedisBroker(settings, keys=k)
             for k in partition_keys(settings.namespace, settings.model, settings.partitions, settings.group)]
    return PartitionedBroker(parts, release_idle_ms=int(settings.lease_s * 1000))
