"""A standalone worker that notes when each stage of its request path starts and ends, for
:mod:`benchmarks.idle_path` (one request in flight at a time, so the notes of one request
are the notes between its send and its result).

    python -m benchmarks.lib.stage_trace OUT_FILE [the flags of python -m benchmarks.lib.bench_worker]

It is the ordinary worker (:mod:`benchmarks.lib.bench_worker`) with these methods wrapped to
note ``time.perf_counter()`` (``CLOCK_MONOTONIC``: one clock for every process of the
machine) as ``(stage, ">" or "<", t)``:

* ``read``: ``RedisBroker.read`` (its return is when the entry is in the worker's hands);
* ``precheck``: the dedupe and cancel pre-checks (``Intake._prechecks``);
* ``queued``: ``Batcher.put``; ``taken``: ``Batcher.next_batch`` returning a batch;
* ``model``: the servable's call on the inference thread; ``model-await``: the event
  loop's side of it (``BatchRunner._in_thread``, hand-over and return included);
* ``commit``: ``RedisBroker.commit`` (the script's round trip).

The notes go to ``OUT_FILE`` as JSON on exit (SIGTERM: the worker drains first).
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

NOTES: list[tuple[str, str, float]] = []


def note(stage: str, edge: str) -> None:
    NOTES.append((stage, edge, time.perf_counter()))


def _wrap_async(cls: type, name: str, stage: str, *, end_only_if: Callable[[Any], bool] | None = None) -> None:
    f = getattr(cls, name)

    @functools.wraps(f)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if end_only_if is None:
            note(stage, ">")
        out = await f(*args, **kwargs)
        if end_only_if is None or end_only_if(out):
            note(stage, "<")
        return out

    setattr(cls, name, wrapped)


def _wrap_sync(cls: type, name: str, stage: str) -> None:
    f = getattr(cls, name)

    @functools.wraps(f)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        note(stage, ">")
        out = f(*args, **kwargs)
        note(stage, "<")
        return out

    setattr(cls, name, wrapped)


def _wrap_model_thread() -> None:
    from headrace.workers.engine.inference import BatchRunner

    in_thread = BatchRunner._in_thread

    async def traced(self: Any, works: Any, fn: Callable[..., Any], *args: Any) -> Any:
        def on_thread(*a: Any) -> Any:
            note("model", ">")
            try:
                return fn(*a)
            finally:
                note("model", "<")

        note("model-await", ">")
        out = await in_thread(self, works, on_thread, *args)
        note("model-await", "<")
        return out

    BatchRunner._in_thread = traced  # type: ignore[method-assign]


def install(out_file: str) -> None:
    """Wrap the stages (see module doc) and write the notes to ``out_file`` at exit."""
    from headrace.workers.broker.redis_broker import RedisBroker
    from headrace.workers.engine.batcher import Batcher
    from headrace.workers.engine.intake import Intake

    _wrap_async(RedisBroker, "read", "read")
    _wrap_async(Intake, "_prechecks", "precheck")
    _wrap_sync(Batcher, "put", "queued")
    _wrap_async(Batcher, "next_batch", "taken", end_only_if=lambda batch: bool(batch))
    _wrap_async(RedisBroker, "commit", "commit")
    _wrap_model_thread()

    def dump() -> None:
        with open(out_file, "w", encoding="utf-8") as fh:
            json.dump(NOTES, fh)

    atexit.register(dump)


def main() -> int:
    install(sys.argv[1])
    from benchmarks.lib.bench_worker import main as worker_main

    return worker_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
