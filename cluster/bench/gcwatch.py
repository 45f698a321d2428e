"""The load generator's own garbage-collector pauses: kept out of the figures, and on record.

A load generator keeps a record per request (a :class:`~headrace.cluster.bench.stats.Sample`,
a lateness figure), so its heap grows all through a run, and CPython's full collections,
which walk every tracked object, grow with it: in a (c) run of ``benchmarks/dataplane.py``
the generator's process spent 4.6 s in 4 471 collections, the longest 197 ms, and every
request in flight waited through each (BENCHMARKS.md, issue 14 phase 6). Those pauses are
the harness's, not the system's under test.

:class:`GcWatch` collects and freezes the heap as the run starts (:func:`gc.freeze`: the
objects alive then are skipped by later collections), so only what the run itself creates
is walked, and counts the collections that still happen while it runs, reported with the
run (:meth:`GcWatch.stats`) so a reader can tell a pause of the generator from one of the
queue.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType
from typing import Any


class GcWatch:
    """A context manager around one run: freeze on entry, count collections until exit.

    The freeze is undone on exit only when this watch made the first one (a process that
    froze its own startup heap keeps it frozen).
    """

    def __init__(self) -> None:
        self.pauses = 0
        self.full = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._started = 0.0
        self._unfreeze = False

    def __enter__(self) -> GcWatch:
        self._unfreeze = gc.get_freeze_count() == 0
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._unfreeze:
            gc.unfreeze()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        took = now - self._started
        self.pauses += 1
        self.full += info.get("generation") == 2
        self.total_s += took
        self.max_s = max(self.max_s, took)

    def stats(self) -> dict[str, Any]:
        """Collections during the run: ``gc_collections`` (all generations), ``gc_full``
        (generation 2), ``gc_total_ms`` and ``gc_max_ms`` (milliseconds of pause)."""
        return {"gc_collections": self.pauses, "gc_full": self.full, "gc_total_ms": self.total_s * 1000.0,
                "gc_max_ms": self.max_s * 1000.0}
