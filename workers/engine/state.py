"""What the tasks of one :class:`~headrace.workers.engine.worker.StreamWorker` share.

The worker's tasks (intake, inference, writer, upkeep) run on one event loop and share
:class:`Shared`: settings, broker, batcher, the entries held (:class:`InFlight`), the commit
queue, counters and metrics, and :class:`Control` (stop flags, interruptible sleep, backoff).
Only the event loop thread touches any of it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from headrace.workers.backends.base import Servable
from headrace.workers.backoff import Backoff, wait_event
from headrace.workers.broker.base import Broker
from headrace.workers.engine.batcher import Batcher
from headrace.workers.metrics import WorkerMetrics
from headrace.workers.pipeline.answers import Answers
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.work import Unit, Work
from headrace.workers.settings import WorkerSettings

RECENT_LATENCIES = 1024  # answered requests behind the latency percentiles in the registry


class InFlight:
    """Entries this consumer holds: read (or claimed) and not yet answered or let go.

    Their lease is refreshed while held; their bytes count against the memory budget.
    ``committing`` are those a commit in progress acknowledges.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self.bytes = 0
        self.committing: set[str] = set()
        self._freed: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Wake :meth:`wait_below` (an entry was let go, or the worker stops)."""
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)
        self._freed = None

    async def wait_below(self, limit_bytes: int, until: Callable[[], bool]) -> None:
        """Wait until fewer than ``limit_bytes`` are held, or ``until()`` is true."""
        while self.bytes >= limit_bytes and not until():
            if self._freed is None:
                self._freed = asyncio.get_running_loop().create_future()
            await asyncio.wait({self._freed})

    def add(self, entry: Entry) -> bool:
        """Hold ``entry``; False when it is held already (our own entry, claimed back)."""
        if entry.entry_id in self._entries:
            return False
        self._entries[entry.entry_id] = entry
        self.bytes += entry.size_bytes if not entry.truncated else 0
        return True

    def pop(self, entry_id: str) -> Entry | None:
        """Let go of an entry (answered, handed back, or owned by another worker now)."""
        entry = self._entries.pop(entry_id, None)
        if entry is not None and not entry.truncated:
            self.bytes -= entry.size_bytes
            self.wake()
        return entry

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def unrun(self) -> list[Entry]:
        """Entries held and not being committed."""
        return [e for i, e in self._entries.items() if i not in self.committing]


class Control:
    """Stop flags and the waits that honour them.

    ``stopping``: no more reading; ``shutdown``: every loop ends now.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.shutdown = False
        self.stop_event = asyncio.Event()
        self.redis_ok = True
        self.last_ok_s = time.monotonic()

    def redis_state(self, ok: bool) -> None:
        self.redis_ok = ok
        if ok:
            self.last_ok_s = time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early when stopping."""
        await wait_event(self.stop_event, seconds)

    def backoff(self, what: str, wake_on_stop: bool = True) -> Backoff:
        """A loop's backoff. ``wake_on_stop``: a stop request ends the wait (loops that exit
        when stopping); the writer keeps its pace while draining instead of spinning on a
        dead connection."""
        return Backoff(what, self.redis_state, self.sleep if wake_on_stop else asyncio.sleep)


@dataclass
class Shared:
    """The state every task of one worker uses (see module doc)."""

    settings: WorkerSettings
    servable: Servable
    broker: Broker
    metrics: WorkerMetrics
    answers: Answers
    batcher: Batcher[Work]
    control: Control = field(default_factory=Control)
    in_flight: InFlight = field(default_factory=InFlight)
    counters: Counter[str] = field(default_factory=Counter)
    commits: asyncio.Queue[Unit | None] = field(default_factory=asyncio.Queue)
    #: (lag, pending) as the maintenance task last read them (for the registry).
    backlog: tuple[int, int] = (0, 0)
    #: samples per entry admitted lately (moving average): sizes reads, and the submit
    #: function counts backlog in samples with it (published in the limits hash).
    samples_per_entry: float = 1.0
    #: submit-to-result times (ms) of the requests answered lately (for the registry).
    recent_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))

    def emit(self, unit: Unit) -> None:
        """Queue ``unit`` for the writer (nothing to do when it holds no op)."""
        if unit.ops:
            self.commits.put_nowait(unit)

    def budget_left(self) -> int:
        """Bytes of entries that may still be read (``memory_budget_bytes`` minus held)."""
        return self.settings.memory_budget_bytes - self.in_flight.bytes
