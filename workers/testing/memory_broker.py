"""In-memory :class:`~headrace.workers.broker.redis_broker.Broker` with Redis Streams semantics, for tests.

A :class:`MemoryStore` holds one model's request stream, its consumer group (pending
entries list with owner, delivery count and delivery time), dedupe markers, reply streams,
dead letters and stats; any number of :class:`MemoryBroker` consumers share it (also across
threads: every method takes one lock). Time comes from an injectable ``clock`` (seconds), so
lease expiry can be tested without sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from headrace.client import errors as E
from headrace.client.protocol import Request, Result, decode_result, encode_request
from headrace.workers.broker.redis_broker import (
    DUPLICATE,
    WRITTEN,
    Ack,
    Backlog,
    BatchStats,
    Broker,
    DeadLetterOp,
    Entry,
    Op,
    Reply,
)


def _key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


@dataclass
class Pending:
    consumer: str
    delivered_at_s: float
    deliveries: int


class ManualClock:
    """A clock for tests: ``clock()`` returns the current time, ``advance(s)`` moves it."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class MemoryStore:
    """Shared state of one model's stream and one consumer group (see module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, dedupe_ttl_s: float = 86_400) -> None:
        self.clock = clock
        self.dedupe_ttl_s = dedupe_ttl_s
        self.lock = threading.RLock()
        self.entries: dict[str, dict[bytes, bytes]] = {}
        self._seq = itertools.count(1)
        self.last_delivered = "0-0"
        self.pel: dict[str, Pending] = {}
        self.consumers: dict[str, float] = {}
        self.done: dict[str, tuple[str, float]] = {}
        self.cancels: dict[str, int] = {}  # request id -> cancelled up to (Unix ms)
        self.replies: dict[str, list[tuple[str, dict[bytes, bytes]]]] = {}
        self.dlq: list[tuple[str, dict[bytes, bytes]]] = []
        self.stats: list[dict[bytes, bytes]] = []
        self.registry: dict[str, dict[str, Any]] = {}
        self.signatures: dict[str, dict[str, Any]] = {}
        self.acked: list[str] = []
        self.group_exists = False
        self.fail_ops = 0  # > 0: the next N broker calls raise BrokerError (outage simulation)

    # --- producer / inspection side (tests) ----------------------------------------------

    def add(self, fields: Mapping[bytes, bytes]) -> str:
        with self.lock:
            entry_id = f"{int(time.time() * 1000)}-{next(self._seq)}"
            self.entries[entry_id] = dict(fields)
            return entry_id

    def add_request(self, request: Request) -> str:
        return self.add(encode_request(request))

    def cancel(self, request_id: str, up_to_ms: int) -> None:
        """Set ``request_id``'s cancel marker (what ``ticket.cancel()`` writes)."""
        with self.lock:
            self.cancels[request_id] = up_to_ms

    def results(self, reply_to: str) -> list[Result]:
        with self.lock:
            return [decode_result(f) for _, f in self.replies.get(reply_to, [])]

    def pending_ids(self, consumer: str | None = None) -> list[str]:
        with self.lock:
            return [i for i, p in self.pel.items() if consumer is None or p.consumer == consumer]

    def undelivered(self) -> int:
        with self.lock:
            return sum(1 for i in self.entries if _key(i) > _key(self.last_delivered))

    # --- broker side ---------------------------------------------------------------------

    def _check_up(self) -> None:
        if self.fail_ops > 0:
            self.fail_ops -= 1
            raise E.BrokerError("memory broker: simulated outage")

    def _touch(self, consumer: str) -> None:
        self.consumers[consumer] = self.clock()

    def _is_done(self, request_id: str) -> bool:
        marker = self.done.get(request_id)
        return marker is not None and marker[1] > self.clock()

    def _set_done(self, request_id: str, entry_id: str) -> bool:
        if self._is_done(request_id):
            return False
        self.done[request_id] = (entry_id, self.clock() + self.dedupe_ttl_s)
        return True

    def _ack(self, entry_id: str) -> None:
        if self.pel.pop(entry_id, None) is not None:
            self.acked.append(entry_id)


class MemoryBroker(Broker):
    """One consumer of a :class:`MemoryStore` (see module doc)."""

    def __init__(self, store: MemoryStore | None = None, consumer: str = "mem-1") -> None:
        self.store = store if store is not None else MemoryStore()
        self.consumer = consumer

    async def ensure_group(self) -> None:
        with self.store.lock:
            self.store._check_up()
            self.store.group_exists = True

    def _read_now(self, count: int) -> list[Entry]:
        s = self.store
        with s.lock:
            s._check_up()
            s._touch(self.consumer)
            out: list[Entry] = []
            for entry_id, fields in s.entries.items():
                if len(out) >= count:
                    break
                if _key(entry_id) <= _key(s.last_delivered):
                    continue
                s.pel[entry_id] = Pending(self.consumer, s.clock(), 1)
                s.last_delivered = entry_id
                out.append(Entry(entry_id, dict(fields), 1))
            return out

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            out = self._read_now(count)
            if out or time.monotonic() >= deadline:
                return out
            await asyncio.sleep(min(0.002, max(0.0, deadline - time.monotonic())))

    async def claim_abandoned(self, min_idle_ms: int, count: int) -> list[Entry]:
        s = self.store
        with s.lock:
            s._check_up()
            now = s.clock()
            out: list[Entry] = []
            for entry_id, p in list(s.pel.items()):
                if len(out) >= count:
                    break
                if (now - p.delivered_at_s) * 1000.0 < min_idle_ms:
                    continue
                if entry_id not in s.entries:  # trimmed/deleted: XAUTOCLAIM drops it from the PEL
                    del s.pel[entry_id]
                    continue
                s.pel[entry_id] = Pending(self.consumer, now, p.deliveries + 1)
                out.append(Entry(entry_id, dict(s.entries[entry_id]), p.deliveries + 1))
            return out

    async def refresh_lease(self, entry_ids: Sequence[str]) -> list[str]:
        s = self.store
        with s.lock:
            s._check_up()
            owned = []
            for entry_id in entry_ids:
                p = s.pel.get(entry_id)
                if p is not None and p.consumer == self.consumer:
                    p.delivered_at_s = s.clock()
                    owned.append(entry_id)
            return owned

    async def release(self, entries: Sequence[Entry], idle_ms: int) -> list[str]:
        s = self.store
        with s.lock:
            s._check_up()
            out = []
            for e in entries:
                p = s.pel.get(e.entry_id)
                if p is not None and p.consumer == self.consumer:
                    s.pel[e.entry_id] = Pending(self.consumer, s.clock() - idle_ms / 1000.0, max(0, e.deliveries - 1))
                    out.append(e.entry_id)
            return out

    async def answered(self, request_ids: Sequence[str]) -> list[bool]:
        with self.store.lock:
            self.store._check_up()
            return [self.store._is_done(r) for r in request_ids]

    async def cancel_marks(self, request_ids: Sequence[str]) -> list[int]:
        with self.store.lock:
            self.store._check_up()
            return [self.store.cancels.get(r, 0) for r in request_ids]

    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        s = self.store
        with s.lock:
            s._check_up()
            at = int(time.time() * 1000)
            out: list[int] = []
            for op in ops:
                if isinstance(op, Ack):
                    out.append(DUPLICATE)
                elif isinstance(op, Reply):
                    if s._set_done(op.request_id, op.entry_id):
                        s.replies.setdefault(op.reply_to, []).append((op.entry_id, dict(op.fields)))
                        out.append(WRITTEN)
                    else:
                        out.append(DUPLICATE)
                elif isinstance(op, DeadLetterOp):
                    if op.request_id is not None and op.reply_to is not None and op.reply_fields is not None:
                        if s._set_done(op.request_id, op.entry_id):
                            s.dlq.append((op.entry_id, op.dlq_fields(at)))
                            s.replies.setdefault(op.reply_to, []).append((op.entry_id, dict(op.reply_fields)))
                            out.append(WRITTEN)
                        else:
                            out.append(DUPLICATE)
                    else:
                        s.dlq.append((op.entry_id, op.dlq_fields(at)))
                        out.append(WRITTEN)
                s._ack(op.entry_id)
            for line in stats:
                s.stats.append(line.to_fields(at))
            return out

    async def trim(self) -> int:
        s = self.store
        with s.lock:
            s._check_up()
            if not s.group_exists:
                return 0
            floor = min((_key(i) for i in s.pel), default=_key(s.last_delivered))
            doomed = [i for i in s.entries if _key(i) < floor]
            for i in doomed:
                del s.entries[i]
            return len(doomed)

    async def backlog(self) -> Backlog:
        with self.store.lock:
            self.store._check_up()
            return Backlog(self.store.undelivered(), len(self.store.pel))

    async def heartbeat(self, worker: Mapping[str, Any], describe: Mapping[str, Any] | None = None,
                        stale_ms: int = 30_000) -> None:
        with self.store.lock:
            self.store._check_up()
            self.store.registry[self.consumer] = {**worker, "seen_ms": int(self.store.clock() * 1000)}
            if describe is not None:
                self.store.signatures[str(worker.get("version", ""))] = dict(describe)

    async def unregister(self) -> None:
        with self.store.lock:
            self.store.registry.pop(self.consumer, None)

    async def delete_idle_consumers(self, min_idle_ms: int, only: str | None = None) -> list[str]:
        s = self.store
        with s.lock:
            s._check_up()
            busy = {p.consumer for p in s.pel.values()}
            now = s.clock()
            gone = [c for c, seen in s.consumers.items()
                    if (only is None or c == only) and c not in busy and (now - seen) * 1000.0 >= min_idle_ms]
            for c in gone:
                del s.consumers[c]
            return gone

    async def ping(self) -> None:
        with self.store.lock:
            self.store._check_up()
