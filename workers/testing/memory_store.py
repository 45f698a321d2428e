"""The shared state behind :class:`~headrace.workers.testing.memory_broker.MemoryBroker`:
one model's request stream, its consumer group (pending entries with owner, delivery count
and delivery time), dedupe markers, reply streams, dead letters and stats, behind one lock
(brokers on several threads share it). Time comes from an injectable ``clock`` (seconds).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from headrace.client import errors as E
from headrace.client.protocol import Request, Result, decode_result, encode_request
from headrace.workers.broker.base import CommitRejected
from headrace.workers.settings import WorkerSettings

__all__ = ["MemoryStore", "Pending", "entry_key"]


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


@dataclass
class Pending:
    consumer: str
    delivered_at_s: float
    deliveries: int


class MemoryStore:
    """Shared state of one model's stream and one consumer group (see module doc).

    Attributes:
        wrong_type: keys holding a value of another type than a stream (writes to them
            fail as in Redis); ``dlq_key`` names the dead-letter stream among them.
        fail_ops: > 0: the next N broker calls raise BrokerError (an outage).
    """

    dlq_key = "dlq"
    requests_key = "requests"

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
        self.inbox: list[bytes] = []
        self.max_payload_bytes = WorkerSettings().max_payload_bytes
        self.wrong_type: set[str] = set()
        self.group_exists = False
        self.fail_ops = 0
        #: the limits hash's samples_per_entry (published by workers).
        self.samples_per_entry = 1.0

    # --- producer / inspection side (tests) ----------------------------------------------

    def add(self, fields: Mapping[bytes, bytes]) -> str:
        with self.lock:
            entry_id = f"{int(time.time() * 1000)}-{next(self._seq)}"
            self.entries[entry_id] = dict(fields)
            return entry_id

    def push(self, element: bytes) -> None:
        """Append ``element`` to the inbox (what the submit function, or a raw RPUSH, does)."""
        with self.lock:
            self.inbox.append(element)

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
            return sum(1 for i in self.entries if entry_key(i) > entry_key(self.last_delivered))

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

    def _add_dlq(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        if self.dlq_key in self.wrong_type:
            raise CommitRejected(f"WRONGTYPE: {self.dlq_key} holds a value of another type")
        self.dlq.append((entry_id, fields))

    def _reply(self, reply_to: str, entry_id: str, fields: Mapping[bytes, bytes]) -> bool:
        if reply_to in self.wrong_type:
            return False
        self.replies.setdefault(reply_to, []).append((entry_id, dict(fields)))
        return True
