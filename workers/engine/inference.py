"""Running batches: the model call off the event loop, failure isolation, results as ops.

:class:`BatchRunner` is the inference stage of a :class:`~headrace.workers.engine.worker.StreamWorker`.
One batch at a time runs in a dedicated thread (ONNX Runtime and torch release the GIL, so
the event loop keeps reading and committing meanwhile). A batch that raises is re-run one
request at a time so its batch-mates are still answered; the failing request is left
pending for redelivery (or dead-lettered after ``max_deliveries``). A model call that runs
past ``infer_timeout_s`` cannot be interrupted: :class:`~headrace.client.errors.ModelTimeoutError`
propagates to the worker, which stops consuming (see ``StreamWorker``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from headrace.client import errors as E
from headrace.client.protocol import STATUS_EXPIRED, STATUS_OK, Result, Timings, now_ms
from headrace.workers.backends.base import Servable
from headrace.workers.engine.admission import Answers, Unit, Work
from headrace.workers.engine.batcher import split_by_length
from headrace.workers.metrics import WorkerMetrics
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)


class InferenceThread:
    """One daemon thread running model calls in order (a one-thread executor).

    Not a ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so a model
    call stuck in native code would keep a worker process from ever exiting.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                fut.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def shutdown(self) -> None:
        """Ask the thread to end after the current call (does not wait for it)."""
        self._jobs.put(None)


class BatchRunner:
    """Run batches of admitted work and turn the outcomes into commit ops.

    Args:
        settings: the worker's settings (``max_deliveries``, ``infer_timeout_s``, model name).
        servable: the loaded model.
        answers: builds result / error / dead-letter ops.
        counters, metrics: the worker's counters and metrics sink.
        release: called with an entry id the worker should stop holding (no lease refresh
            any more), so the entry is redelivered after ``lease_s``.
        consumer: this worker's consumer name (reported in result timings).
        index: which of the worker's ``instances`` this runner is (names its thread).
    """

    def __init__(self, settings: WorkerSettings, servable: Servable, answers: Answers, counters: Counter[str],
                 metrics: WorkerMetrics, release: Callable[[str], object], consumer: str, index: int = 0) -> None:
        self.settings = settings
        self.servable = servable
        self.answers = answers
        self.counters = counters
        self.metrics = metrics
        self.release = release
        self.consumer = consumer
        self.thread = InferenceThread(f"headrace-infer-{settings.model}-{index}")
        #: the requests of the model call in progress (or the last one).
        self.running: list[Work] = []

    async def run_batch(self, batch: Sequence[Work], unit: Unit) -> None:
        """Run ``batch`` (expired requests answered without running; text split into length
        buckets) and add the ops to commit to ``unit``.

        Raises:
            ModelTimeoutError: one model call ran past ``infer_timeout_s`` (it may still be
                running in the inference thread; :attr:`running` holds its requests, and
                ``unit`` what finished before it).
        """
        at = now_ms()
        live: list[Work] = []
        for w in batch:
            env = w.request.envelope
            if env.expired(at):
                self.answers.error(env, w.entry, E.DEADLINE_EXCEEDED, "deadline passed while queued in the worker",
                                   unit, status=STATUS_EXPIRED)
            else:
                live.append(w)
        # Redelivered requests were in a batch whose worker died or hung: each runs on its
        # own, so a request that kills or wedges workers takes no batch-mates down with it.
        suspects = [w for w in live if w.entry.deliveries > 1]
        fresh = [w for w in live if w.entry.deliveries <= 1]
        buckets = (split_by_length([w.length for w in fresh])
                   if self.servable.accepts_text else [list(range(len(fresh)))])
        for bucket in buckets:
            if bucket:
                await self._run_bucket([fresh[i] for i in bucket], unit)
        for w in suspects:
            await self._run_bucket([w], unit)

    async def _call_model(self, works: Sequence[Work]) -> list[dict[str, Any]]:
        self.running = list(works)
        reqs = [w.request for w in works]
        call = asyncio.wrap_future(self.thread.submit(self.servable.infer, reqs))
        limit_s = self.settings.infer_timeout_s
        try:
            outs = await asyncio.wait_for(call, limit_s) if limit_s > 0 else await call
        except asyncio.TimeoutError as e:
            raise E.ModelTimeoutError(
                f"model call on {len(reqs)} requests (e.g. {reqs[0].envelope.request_id}) still running after "
                f"infer_timeout_s={limit_s:g}s") from e
        if not isinstance(outs, list) or len(outs) != len(reqs) or not all(isinstance(o, dict) for o in outs):
            n = len(outs) if hasattr(outs, "__len__") else "?"
            raise E.ModelError(f"servable returned {type(outs).__name__} of {n} items for {len(reqs)} requests; "
                               "expected one output map per request")
        return outs

    async def _run_bucket(self, works: list[Work], unit: Unit) -> None:
        t0 = time.perf_counter()
        try:
            outs = await self._call_model(works)
        except E.ModelTimeoutError:
            raise  # the thread is stuck: isolating one by one would queue behind it
        except Exception as err:  # noqa: BLE001 - isolate the failing request(s) below
            if len(works) == 1:
                self._failed(works[0], err, unit)
                return
            log.warning("batch of %d failed (%s); re-running one by one to isolate", len(works), err)
            for w in works:
                await self._run_bucket([w], unit)
            return
        infer_s = time.perf_counter() - t0
        self.metrics.observe_batch(len(works), infer_s)
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(works)
        unit.batch += len(works)
        unit.infer_ms += infer_s * 1000
        for w, out in zip(works, outs, strict=True):
            env = w.request.envelope
            queue_ms = max(0.0, float(w.read_ms - env.ts_ms)) if env.ts_ms else 0.0
            res = Result(env.request_id, STATUS_OK, out, model=self.settings.model, version=self.servable.version,
                         timings=Timings(queue_ms, infer_s * 1000, len(works), self.consumer))
            try:
                self.answers.reply(env, w.entry, res, unit, queue_ms / 1000)
            except E.HeadraceError as err:  # e.g. an output dtype that is not a wire dtype
                self.answers.error(env, w.entry, E.MODEL_ERROR, f"cannot encode the model output: {err.message}",
                                   unit)

    def _failed(self, w: Work, err: BaseException, unit: Unit) -> None:
        entry, env = w.entry, w.request.envelope
        if entry.deliveries >= self.settings.max_deliveries:
            self.answers.dead_letter(entry, env, E.MODEL_ERROR, f"model failed on each of {entry.deliveries} "
                                     f"deliveries; last: {type(err).__name__}: {err}", unit)
            return
        # Leave it pending and stop renewing its lease: after lease_s some worker reclaims it
        # (delivery count + 1) and tries again, until max_deliveries sends it to the DLQ.
        self.release(entry.entry_id)
        self.counters["retried"] += 1
        log.warning("request %s failed on delivery %d/%d, will be retried after the lease: %s",
                    env.request_id, entry.deliveries, self.settings.max_deliveries, err)

    def close(self) -> None:
        """Let the inference thread go (without waiting: a stuck model call cannot be joined)."""
        self.thread.shutdown()
