"""In-memory :class:`~headrace.workers.broker.base.Broker` with Redis Streams semantics, for tests.

A :class:`~headrace.workers.testing.memory_store.MemoryStore` holds one model's request
stream, its consumer group (pending entries list with owner, delivery count and delivery
time), dedupe markers, reply streams, dead letters and stats; any number of
:class:`MemoryBroker` consumers share it (also across threads: every method takes one lock).
Time comes from an injectable ``clock`` (seconds), so lease expiry can be tested without
sleeping. ``tests/integration/test_broker_contract.py`` holds it to the Redis broker's
behaviour: byte-budgeted reads with truncated oversize entries, ``UNWRITABLE`` replies to
keys of another type, refused commits, outages on every call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from headrace.client import errors as E
from headrace.client.protocol import now_ms
from headrace.workers.broker.backlog import Backlog
from headrace.workers.broker.base import Broker
from headrace.workers.broker.inbox import RelayStep, check_element
from headrace.workers.pipeline.entry import Entry, fields_bytes, truncated_entry
from headrace.workers.pipeline.ops import (
    DLQ_ENTRY_BYTES,
    DLQ_SCRIPT_NAMES,
    DUPLICATE,
    UNWRITABLE,
    WRITTEN,
    Ack,
    Op,
    Reply,
)
from headrace.workers.pipeline.stats import BatchStats
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.clock import ManualClock
from headrace.workers.testing.memory_store import MemoryStore, Pending, entry_key

__all__ = ["ManualClock", "MemoryBroker", "MemoryStore", "Pending"]


class MemoryBroker(Broker):
    """One consumer of a :class:`MemoryStore` (see module doc).

    Args:
        max_entry_bytes: entries larger than this are returned truncated (default: the
            worker settings' default).
    """

    def __init__(self, store: MemoryStore | None = None, consumer: str = "mem-1",
                 max_entry_bytes: int | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.consumer = consumer
        defaults = WorkerSettings()
        self.max_entry_bytes = defaults.max_entry_bytes if max_entry_bytes is None else max_entry_bytes
        self.default_budget_bytes = defaults.memory_budget_bytes

    async def ensure_group(self) -> None:
        with self.store.lock:
            self.store._check_up()
            self.store.group_exists = True

    def _sized(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> Entry:
        size = fields_bytes(fields)
        if size > self.max_entry_bytes:
            return truncated_entry(entry_id, fields, deliveries, size, len(fields))
        return Entry(entry_id, dict(fields), deliveries, size)

    def _read_now(self, count: int, budget_bytes: int) -> list[Entry]:
        s = self.store
        with s.lock:
            s._check_up()
            # Every read registers the consumer (Redis 7.0 does so once a read delivers
            # something); when a consumer appears is not part of the broker contract.
            s._touch(self.consumer)
            out: list[Entry] = []
            total = 0
            for entry_id, fields in s.entries.items():
                if len(out) >= count:
                    break
                if entry_key(entry_id) <= entry_key(s.last_delivered):
                    continue
                entry = self._sized(entry_id, fields, 1)
                if out and (entry.truncated or total + entry.size_bytes > budget_bytes):
                    break
                s.pel[entry_id] = Pending(self.consumer, s.clock(), 1)
                s.last_delivered = entry_id
                out.append(entry)
                total += entry.size_bytes
                if entry.truncated:
                    break
            return out

    async def read(self, count: int, block_ms: int, budget_bytes: int | None = None) -> list[Entry]:
        budget_bytes = self.default_budget_bytes if budget_bytes is None else budget_bytes
        out = self._read_now(count, budget_bytes)
        deadline = time.monotonic() + block_ms / 1000.0
        while not out and time.monotonic() < deadline:
            await asyncio.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
            out = self._read_now(1, budget_bytes)  # a read that waited brings one entry, as in Redis
        return out

    async def claim_abandoned(self, min_idle_ms: int, count: int, budget_bytes: int | None = None) -> list[Entry]:
        budget_bytes = self.default_budget_bytes if budget_bytes is None else budget_bytes
        s = self.store
        with s.lock:
            s._check_up()
            now = s.clock()
            out: list[Entry] = []
            total = 0
            for entry_id, p in sorted(s.pel.items(), key=lambda kv: entry_key(kv[0])):
                if len(out) >= count:
                    break
                if (now - p.delivered_at_s) * 1000.0 < min_idle_ms:
                    continue
                if entry_id not in s.entries:  # deleted while pending: nothing left to run
                    s._ack(entry_id)
                    continue
                entry = self._sized(entry_id, s.entries[entry_id], p.deliveries + 1)
                if out and not entry.truncated and total + entry.size_bytes > budget_bytes:
                    break
                s.pel[entry_id] = Pending(self.consumer, now, p.deliveries + 1)
                total += 0 if entry.truncated else entry.size_bytes
                out.append(entry)
            if out:
                s._touch(self.consumer)
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

    def _apply(self, op: Op, at: int) -> int:
        s = self.store
        if isinstance(op, Ack):
            return DUPLICATE
        if isinstance(op, Reply):
            if not s._set_done(op.request_id, op.entry_id):
                return DUPLICATE
            if s._reply(op.reply_to, op.entry_id, op.fields):
                return WRITTEN
            del s.done[op.request_id]
            reason, code, entry, deliveries, ts = DLQ_SCRIPT_NAMES
            s._add_dlq(op.entry_id, {b"id": op.fields.get(b"id", b""), b"reply_to": op.reply_to.encode(),
                                     reason: f"reply_to is not writable: WRONGTYPE {op.reply_to}".encode(),
                                     code: E.INTERNAL_ERROR.encode(), entry: op.entry_id.encode(),
                                     deliveries: b"0", ts: str(at).encode()})
            return UNWRITABLE
        if op.request_id is not None and op.reply_to is not None and op.reply_fields is not None:
            if not s._set_done(op.request_id, op.entry_id):
                return DUPLICATE
            s._add_dlq(op.entry_id, op.dlq_fields(at))
            s._reply(op.reply_to, op.entry_id, op.reply_fields)
            return WRITTEN
        s._add_dlq(op.entry_id, op.dlq_fields(at))
        return WRITTEN

    async def commit(self, ops: Sequence[Op], stats: Sequence[BatchStats] = ()) -> list[int]:
        s = self.store
        with s.lock:
            s._check_up()
            at = int(time.time() * 1000)
            out: list[int] = []
            for op in ops:
                # Applied one by one, not rolled back on a refusal: as a Redis script.
                out.append(self._apply(op, at))
                s._ack(op.entry_id)
            for line in stats:
                s.stats.append(line.to_fields(at))
            return out

    async def relay(self, count: int) -> RelayStep:
        s = self.store
        with s.lock:
            s._check_up()
            if s.requests_key in s.wrong_type:  # the relay puts everything back and fails
                raise E.BrokerError(f"inbox relay failed: WRONGTYPE {s.requests_key}; requests put back")
            taken, s.inbox = s.inbox[:count], s.inbox[count:]
            added = 0
            for raw in taken:
                flat, refused = check_element(raw, s.max_payload_bytes)
                if flat is not None:
                    s.add(dict(zip(flat[0::2], flat[1::2], strict=True)))
                    added += 1
                elif refused is not None:
                    reason, code, entry, deliveries, ts = DLQ_SCRIPT_NAMES
                    s._add_dlq("inbox", {reason: refused[1].encode(), code: refused[0].encode(), entry: b"inbox",
                                         deliveries: b"0", ts: str(now_ms()).encode(),
                                         DLQ_ENTRY_BYTES: str(len(raw)).encode()})
            return RelayStep(added, len(taken) - added, len(s.inbox))

    async def wait_inbox(self, block_ms: int) -> bool:
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            with self.store.lock:
                self.store._check_up()
                if self.store.inbox:
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def trim(self) -> int:
        s = self.store
        with s.lock:
            s._check_up()
            if not s.group_exists:
                return 0
            floor = min((entry_key(i) for i in s.pel), default=entry_key(s.last_delivered))
            doomed = [i for i in s.entries if entry_key(i) < floor]
            for i in doomed:
                del s.entries[i]
            return len(doomed)

    async def publish_samples_per_entry(self, value: float) -> None:
        with self.store.lock:
            self.store._check_up()
            self.store.samples_per_entry = max(1.0, value)

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
            self.store._check_up()
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
