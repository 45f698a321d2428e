"""The stream worker: a pipelined loop from a model's request stream to its reply streams.

Tasks of one :class:`StreamWorker` (one event loop; their state is
:class:`~headrace.workers.engine.state.Shared`):

* reader and claimer (:mod:`~headrace.workers.engine.intake`): read new entries, take over
  abandoned ones, admit them (answer what cannot run, batch the rest);
* inference, one per ``instances`` (:class:`~headrace.workers.engine.inference.BatchRunner`):
  one batch at a time on a dedicated thread; a failing call is split until the failing
  request is alone; a call past ``infer_timeout_s`` stops the worker (``stuck``);
* writer (:mod:`~headrace.workers.engine.writer`): one atomic commit script per batch
  (results + dedupe markers + acks), merging what queued up meanwhile;
* lease and maintenance (:mod:`~headrace.workers.engine.upkeep`);
* relay (:mod:`~headrace.workers.engine.relay`): the model's inbox into its request stream.

Redis outages never end the loop: each task backs off (capped at 2 s) and resumes;
:meth:`StreamWorker.healthy` reports the outage meanwhile. A request never ends a task:
every per-entry step fails for that entry alone. If a task dies anyway (a bug, an
unexpected exception), the worker fails (:attr:`StreamWorker.failed`): it stops at once
without draining, so its leases lapse and other workers take its entries; a standalone
worker exits non-zero, a Ray replica fails its health check.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from headrace.client import errors as E
from headrace.client.protocol import now_ms
from headrace.workers.backends.base import Servable
from headrace.workers.broker.base import Broker
from headrace.workers.engine.admission import Admission
from headrace.workers.engine.batcher import Batcher
from headrace.workers.engine.inference import BatchRunner
from headrace.workers.engine.intake import Intake
from headrace.workers.engine.relay import Relay
from headrace.workers.engine.state import Shared
from headrace.workers.engine.upkeep import Upkeep
from headrace.workers.engine.writer import REFUSED, Writer
from headrace.workers.metrics import NullMetrics, WorkerMetrics
from headrace.workers.pipeline.answers import Answers
from headrace.workers.pipeline.entry import elapsed_ms, plausible_ms
from headrace.workers.pipeline.ops import DUPLICATE, UNWRITABLE, DeadLetterOp, Op
from headrace.workers.pipeline.work import Unit, Work, split_work
from headrace.workers.settings import WorkerSettings, live_fields

log = logging.getLogger(__name__)

END_TASKS_TIMEOUT_S = 5.0


class WorkerFailed(E.HeadraceError):
    """An internal task of the worker died: it stopped consuming, and its entries go to
    other workers once their lease lapses."""

    code = E.INTERNAL_ERROR


class StreamWorker:
    """Consume one model's request stream (see module doc and docs/design.md).

    Args:
        settings: what to consume and how.
        servable: the loaded model.
        broker: queue access; ``None`` uses :class:`~headrace.workers.broker.redis_broker.RedisBroker`.
        metrics: where to report; ``None`` discards.

    Raises:
        ConfigError: ``instances`` > 1 with a servable that is not thread-safe.
    """

    def __init__(self, settings: WorkerSettings, servable: Servable, broker: Broker | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        if settings.instances > 1 and not servable.thread_safe:
            raise E.ConfigError(f"instances={settings.instances} needs a thread-safe servable; "
                                f"{type(servable).__name__} is not: use instances=1")
        if broker is None:
            from headrace.workers.broker.partitioned import redis_broker

            broker = redis_broker(settings)
        self.servable = servable
        self.broker = broker
        self.consumer = broker.consumer
        self.metrics: WorkerMetrics = metrics if metrics is not None else NullMetrics()
        answers = Answers(settings.model, servable.version, self.consumer)
        batcher: Batcher[Work] = Batcher(settings.max_batch, settings.preferred_batch, settings.max_wait_ms,
                                         split=split_work)
        self.shared = Shared(settings, servable, broker, self.metrics, answers, batcher)
        self._intake = Intake(self.shared, Admission(settings, servable, answers, self.shared.counters, self.metrics))
        self._runners = [BatchRunner(settings, servable, answers, k) for k in range(settings.instances)]
        self._writer = Writer(self.shared, self.consumer, self._after_commit)
        self._upkeep = Upkeep(self.shared, self.consumer)
        self._relay = Relay(self.shared)
        #: set when a model call ran past ``infer_timeout_s`` (the worker then stops).
        self.stuck: E.ModelTimeoutError | None = None
        #: set when an internal task died (the worker then stops without draining).
        self.failed: WorkerFailed | None = None
        #: set (thread-safely) once the worker consumes: its group exists.
        self.started = threading.Event()
        self._drain = True
        self._running = False
        self._finished: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    @property
    def settings(self) -> WorkerSettings:
        return self.shared.settings

    @property
    def running(self) -> bool:
        """True from the moment the worker consumes until its loop has ended."""
        return self._running

    # --- public API ------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`; returns after draining. Never raises for a request
        or a Redis outage (see :attr:`stuck` and :attr:`failed` for why it stopped early)."""
        self._finished = asyncio.Event()
        try:
            if not await self._join_group():
                return
            await self._upkeep.heartbeat_once()
            self._running = True
            self.started.set()
            log.info("worker %s serving %s (version %s) max_batch=%d lease_s=%.1f", self.consumer,
                     self.settings.model, self.servable.version, self.settings.max_batch, self.settings.lease_s)
            readers, infer, writer = self._spawn()
            await self.shared.control.stop_event.wait()
            await self._wind_down(readers, infer, writer)
        finally:
            self._running = False
            for runner in self._runners:
                runner.close()
            self._intake.close()
            await self.broker.close()
            self._finished.set()
            log.info("worker %s stopped: %s", self.consumer, dict(self.shared.counters))

    async def stop(self, drain: bool = True) -> None:
        """Stop reading; with ``drain`` finish and ack in-flight work (up to
        ``drain_timeout_s``), else abandon it to be reclaimed after the lease. Returns when
        the loop has ended. Safe to call more than once."""
        c = self.shared.control
        self._drain = self._drain and drain
        c.stopping = True
        # Wake the reader if it waits for room; the batcher itself is closed only once the
        # readers are done, so entries returned by a read still in flight get run too.
        self.shared.batcher.wake()
        self.shared.in_flight.wake()
        if not self._drain:
            self.shared.batcher.close()
        if self._finished is None:
            return
        c.stop_event.set()
        await self._finished.wait()

    def healthy(self) -> bool:
        """True while the loop runs, every task is alive and Redis answered recently."""
        c = self.shared.control
        if not self._running or c.stopping or self.stuck is not None or self.failed is not None:
            return False
        if any(t.done() for t in self._tasks):
            return False
        recent = time.monotonic() - c.last_ok_s < max(10.0, 3 * self.settings.block_ms / 1000.0)
        return c.redis_ok and recent

    def reconfigure(self, **changes: Any) -> None:
        """Change the live settings (``max_batch``, ``preferred_batch``, ``max_wait_ms``).

        Raises:
            ConfigError: another setting was named, or a value is invalid.
        """
        unknown = set(changes) - set(live_fields())
        if unknown:
            raise E.ConfigError(f"cannot reconfigure {sorted(unknown)} live; only {sorted(live_fields())}")
        self.shared.settings = self.settings.replace(**changes)
        self.shared.batcher.configure(max_batch=self.settings.max_batch,
                                      preferred_batch=self.settings.preferred_batch,
                                      max_wait_ms=self.settings.max_wait_ms)
        log.info("worker %s reconfigured: %s", self.consumer, changes)

    def registry_facts(self) -> dict[str, Any]:
        """This worker's entry in the model registry (see :meth:`Upkeep.registry_facts`)."""
        return self._upkeep.registry_facts()

    def stats(self) -> dict[str, Any]:
        """Counters for status and autoscaling (a snapshot; plain JSON-able values)."""
        c, s = self.shared.counters, self.settings
        return {
            "consumer": self.consumer, "model": s.model, "version": self.servable.version,
            "running": self._running, "healthy": self.healthy(), "in_flight": len(self.shared.in_flight),
            "in_flight_bytes": self.shared.in_flight.bytes, "queued": len(self.shared.batcher),
            "max_batch": s.max_batch, "instances": s.instances, "preferred_batch": s.effective_preferred_batch,
            "max_wait_ms": s.max_wait_ms, "failed": str(self.failed) if self.failed else "",
            "avg_batch": (c["batched_requests"] / c["batches"]) if c["batches"] else 0.0, **dict(c),
        }

    # --- tasks -------------------------------------------------------------------------------

    async def _join_group(self) -> bool:
        c = self.shared.control
        backoff = c.backoff("create consumer group")
        while not c.stopping:
            try:
                await self.broker.ensure_group()
                backoff.ok()
                return True
            except E.BrokerError as e:
                await backoff.wait(e)
        return False

    def _spawn(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]], asyncio.Task[None]]:
        spawn = asyncio.get_running_loop().create_task
        readers = [spawn(self._intake.read_loop(), name="read"), spawn(self._intake.claim_loop(), name="claim")]
        infer = [spawn(self._infer_loop(r), name=f"infer-{k}") for k, r in enumerate(self._runners)]
        writer = spawn(self._writer.run(), name="write")
        upkeep = [spawn(self._upkeep.lease_loop(), name="lease"), spawn(self._upkeep.maintenance_loop(), name="maint"),
                  spawn(self._relay.relay_loop(), name="relay")]
        self._tasks = [*readers, *infer, writer, *upkeep]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        return readers, infer, writer

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: a task that ends with an exception, or ends while the worker is not
        stopping, fails the worker."""
        c = self.shared.control
        if task.cancelled() or self.failed is not None:
            return
        err = task.exception()
        if err is None and (c.stopping or c.shutdown or self.stuck is not None):
            return
        what = f"{type(err).__name__}: {err}" if err is not None else "it returned"
        self.failed = WorkerFailed(f"worker task {task.get_name()!r} died ({what}); the worker stops, its entries "
                                   f"go to other workers after lease_s={self.settings.lease_s:g}")
        log.critical("%s", self.failed.message, exc_info=err)
        self._stop_soon(drain=False)

    def _stop_soon(self, drain: bool) -> None:
        stopper = asyncio.get_running_loop().create_task(self.stop(drain=drain))
        self._background.add(stopper)
        stopper.add_done_callback(self._background.discard)

    async def _infer_loop(self, runner: BatchRunner) -> None:
        s = self.shared
        while not s.control.shutdown:
            batch = await s.batcher.next_batch()
            if batch is None:
                return
            unit = Unit()
            try:
                released = await runner.run_batch(batch, unit)
            except E.ModelTimeoutError as err:
                self._stuck(runner, unit, err)
                return
            for w in released:
                s.in_flight.pop(w.entry.entry_id)
                s.counters["retried"] += 1
            self._record_calls(unit)
            s.emit(unit)

    def _stuck(self, runner: BatchRunner, unit: Unit, err: E.ModelTimeoutError) -> None:
        # The call cannot be interrupted and holds its inference thread: commit what
        # finished, stop consuming (drain flushes the writer, then the entries never run are
        # handed back, see _wind_down). A call of one entry alone has found its culprit,
        # answered now; the entries of a call of several keep their delivery: after lease_s
        # another worker runs each of them alone.
        blamed = runner.blame_stuck(err, unit)
        self._record_calls(unit)
        self.shared.emit(unit)
        log.error("%s; this worker stops (unhealthy); %s", err,
                  "that request ran alone and is dead-lettered" if blamed else
                  f"requests of that call are retried by other workers after lease_s={self.settings.lease_s:.1f}")
        self.shared.counters["infer_timeouts"] += 1
        self.stuck = err
        if not blamed:
            for w in runner.running:
                self.shared.in_flight.pop(w.entry.entry_id)
        self._stop_soon(drain=True)

    def _record_calls(self, unit: Unit) -> None:
        for call in unit.calls:
            self.metrics.observe_batch(call.size, call.infer_s)
            self.shared.counters["batches"] += 1
            self.shared.counters["batched_requests"] += call.size

    def _after_commit(self, ops: Sequence[Op], units: Sequence[Unit], outcomes: Sequence[int]) -> None:
        at = now_ms()
        counters = self.shared.counters
        metas = [m for u in units for m in u.meta]
        for op, meta, outcome in zip(ops, metas, outcomes, strict=True):
            self.shared.in_flight.pop(op.entry_id)
            if meta is None or outcome == REFUSED:
                continue
            if outcome == DUPLICATE:
                counters["duplicates"] += 1
                continue
            if outcome == UNWRITABLE:
                counters["unwritable_reply"] += 1
                log.warning("reply stream of entry %s is not writable; moved to the DLQ", op.entry_id)
                continue
            counters[f"answered_{meta.status}"] += 1
            if isinstance(op, DeadLetterOp):
                counters["dead_lettered"] += 1
            total_ms = elapsed_ms(at, meta.ts_ms)
            self.metrics.observe_request(meta.status, meta.code, meta.queue_s, total_ms / 1000.0)
            if plausible_ms(meta.ts_ms):
                self.shared.recent_ms.append(total_ms)

    # --- shutdown ----------------------------------------------------------------------------

    async def _wind_down(self, readers: list[asyncio.Task[None]], infer: list[asyncio.Task[None]],
                         writer: asyncio.Task[None]) -> None:
        if self._drain:
            # asyncio.wait, not wait_for: on timeout we must not block on cancelling it.
            drain = asyncio.get_running_loop().create_task(self._drain_pipeline(readers, infer, writer), name="drain")
            self._tasks.append(drain)
            done, _ = await asyncio.wait({drain}, timeout=self.settings.drain_timeout_s)
            if not done:
                log.warning("drain timed out after %.1fs; %d entries stay pending for other workers",
                            self.settings.drain_timeout_s, len(self.shared.in_flight))
        if self.stuck is not None:
            await self._hand_back()
        await self._end_tasks()
        await self._leave()

    async def _drain_pipeline(self, readers: list[asyncio.Task[None]], infer: list[asyncio.Task[None]],
                              writer: asyncio.Task[None]) -> None:
        # Readers finish their current (blocking, <= block_ms) call and admit what it
        # returned; then the batcher hands out the rest, inference ends, the writer flushes.
        s = self.shared
        await asyncio.gather(*readers, return_exceptions=True)
        log.debug("drain: readers done, %d queued, %d in flight", len(s.batcher), len(s.in_flight))
        s.batcher.close()
        await asyncio.gather(*infer, return_exceptions=True)
        s.commits.put_nowait(None)
        await asyncio.gather(writer, return_exceptions=True)
        log.debug("drain: results written, %d in flight", len(s.in_flight))

    async def _end_tasks(self) -> None:
        # On Python < 3.12 a cancellation can be lost inside redis-py (its asyncio.wait_for
        # around socket writes drops a cancel that races the write's completion, CPython
        # gh-86296) and the task just carries on with its loop: so every loop also checks
        # shutdown, and this wait is bounded.
        self.shared.control.shutdown = True
        self.shared.batcher.close()
        for t in self._tasks:
            t.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=END_TASKS_TIMEOUT_S)
        for t in stuck:
            log.warning("task %s did not end within %.0f s of shutdown; abandoning it", t.get_name(),
                        END_TASKS_TIMEOUT_S)

    async def _hand_back(self) -> None:
        """Release the entries read but never run (a stuck model call stopped the worker),
        so other workers take them at once without counting this delivery."""
        unrun = self.shared.in_flight.unrun()
        if not unrun:
            return
        try:
            done = await self.broker.release(unrun, int(self.settings.lease_s * 1000))
            log.info("handed back %d entries never run (e.g. %s)", len(done), unrun[0].entry_id)
            for entry_id in done:
                self.shared.in_flight.pop(entry_id)
        except E.BrokerError as e:
            log.warning("could not hand back %d entries (%s); they are redelivered after the lease", len(unrun), e)

    async def _leave(self) -> None:
        try:
            await self.broker.unregister()
            # Deletes this consumer only when it owns nothing (atomic check in the script):
            # entries still pending after a timed-out drain must stay claimable.
            await self.broker.delete_idle_consumers(0, only=self.consumer)
        except E.BrokerError as e:
            log.warning("could not unregister %s: %s", self.consumer, e)


__all__ = ["StreamWorker", "WorkerFailed"]
