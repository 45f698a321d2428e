"""Keep the cyclic garbage collector off the objects a worker keeps for its whole life.

A worker process holds hundreds of thousands of long-lived objects that are not garbage:
the modules of numpy, the tokenizer, ONNX Runtime or torch, the model's own Python objects.
CPython's full (generation 2) collection walks every tracked object each time it runs, and
it runs every so often however much of that heap is new. While it walks, the event loop
stands still, and every request in flight waits (BENCHMARKS.md, issue 14 "(c)": the queue's
p99 latency at half load, with and without the freeze).

:func:`freeze_startup_heap` collects once, then moves every object alive into the permanent
generation (:func:`gc.freeze`): later collections skip them. Objects created afterwards are
collected as before; reference counting still frees frozen objects that stop being used.
Only cyclic garbage that was already unreachable at the freeze would be kept, and the
collection just before leaves none.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now out of the collector's reach.

    Call once per process, after the model is loaded and before serving. Returns the
    number of objects in the permanent generation afterwards.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d startup objects out of the garbage collector's walks (%.0f ms)", frozen,
             (time.perf_counter() - started) * 1000.0)
    return frozen
