"""The stream worker: a pipelined loop from a model's request stream to its reply streams.

Tasks of one :class:`StreamWorker` (one event loop):

* reader: ``XREADGROUP ... COUNT <room> BLOCK block_ms >``, then admission (decode, dedupe
  pre-check, deadline, model/version/shape checks). Requests that cannot run are answered
  right away; the rest go to the :class:`~headrace.workers.engine.batcher.Batcher`. The reader
  prefetches at most one batch ahead, so the next batch is read and decoded while the
  current one runs.
* claimer: every ``lease_s / 2`` takes over entries abandoned by dead consumers
  (``XAUTOCLAIM``); entries delivered more than ``max_deliveries`` times are dead-lettered.
* inference: one batch at a time in a dedicated thread (the backend releases the GIL), see
  :class:`~headrace.workers.engine.inference.BatchRunner`: a failing batch is re-run one request at
  a time so batch-mates still get answered, and the failing request is left un-acked to be
  retried after the lease, then dead-lettered. A model call past ``infer_timeout_s`` stops
  the worker (unhealthy): its entries go to other workers after the lease.
* writer: one atomic commit script per batch (results + dedupe markers + acks), merging
  what queued up meanwhile, while the next batch already runs.
* lease: every ``lease_s / 3`` refreshes the idle time of everything in flight, so a batch
  that outlives the lease is not stolen and run twice.
* maintenance: heartbeat in ``<ns>:models``, backlog metrics, trimming, idle-consumer cleanup.

Redis outages never end the loop: each task backs off exponentially (capped at 2 s) and
resumes; :meth:`StreamWorker.healthy` reports the outage meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from headrace.client import errors as E
from headrace.client.protocol import Envelope, decode_envelope, now_ms
from headrace.workers.backends.base import Servable
from headrace.workers.backoff import Backoff, wait_event
from headrace.workers.broker.redis_broker import DUPLICATE, UNWRITABLE, Broker, DeadLetterOp, Entry
from headrace.workers.engine.admission import Admission, Answers, Unit, Work
from headrace.workers.engine.batcher import Batcher
from headrace.workers.engine.inference import BatchRunner
from headrace.workers.metrics import NullMetrics, WorkerMetrics
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
MAX_COMMIT_OPS = 4096  # ops merged into one commit script call
RECONFIGURABLE = frozenset({"max_batch", "preferred_batch", "max_wait_ms"})
RECENT_LATENCIES = 1024  # answered requests behind the latency percentiles in the registry


def consumer_idle_delete_ms(settings: WorkerSettings) -> int:
    """Idle time after which a consumer with nothing pending is deleted from the group:
    well beyond any live worker's gap between two reads."""
    return int(max(60.0, 10 * settings.lease_s, 5 * settings.block_ms / 1000.0) * 1000)


class StreamWorker:
    """Consume one model's request stream (see module doc and docs/design.md).

    Args:
        settings: what to consume and how.
        servable: the loaded model.
        broker: queue access; ``None`` uses :class:`~headrace.workers.broker.redis_broker.RedisBroker`.
        metrics: where to report; ``None`` discards.
    """

    def __init__(self, settings: WorkerSettings, servable: Servable, broker: Broker | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        if broker is None:
            from headrace.workers.broker.redis_broker import RedisBroker

            broker = RedisBroker(settings)
        self.settings = settings
        self.servable = servable
        self.broker = broker
        self.consumer = broker.consumer
        self.metrics: WorkerMetrics = metrics if metrics is not None else NullMetrics()
        self._batcher: Batcher[Work] = Batcher(settings.max_batch, settings.preferred_batch, settings.max_wait_ms)
        self._in_flight: dict[str, Entry] = {}
        self._committing: set[str] = set()  # acked by a commit that has not returned yet
        self._commits: asyncio.Queue[Unit | None] | None = None
        self._stop_event: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None
        self._counters: Counter[str] = Counter()
        self._answers = Answers(settings.model, servable.version, self.consumer)
        self._admission = Admission(settings, servable, self._answers, self._counters, self.metrics)
        if settings.instances > 1 and not servable.thread_safe:
            raise E.ConfigError(f"instances={settings.instances} needs a thread-safe servable; "
                                f"{type(servable).__name__} is not: use instances=1")
        self._runners = [BatchRunner(settings, servable, self._answers, self._counters, self.metrics,
                                     lambda entry_id: self._in_flight.pop(entry_id, None), self.consumer, k)
                         for k in range(settings.instances)]
        self._background: set[asyncio.Task[None]] = set()
        #: set when a model call ran past ``infer_timeout_s`` (the worker then stops).
        self.stuck: E.ModelTimeoutError | None = None
        self._stopping = False
        self._shutdown = False
        self._drain = True
        self._running = False
        self._redis_ok = True
        self._last_ok_s = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        # For the registry facts: the backlog as last read, and recent submit-to-result times (ms).
        self._backlog = (0, 0)
        self._recent_ms: collections.deque[float] = collections.deque(maxlen=RECENT_LATENCIES)

    # --- public API ------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`; returns after draining. Never raises for a request
        or a Redis outage."""
        self._stop_event, self._finished = asyncio.Event(), asyncio.Event()
        self._commits = asyncio.Queue()
        try:
            backoff = self._backoff("create consumer group")
            while not self._stopping:
                try:
                    await self.broker.ensure_group()
                    backoff.ok()
                    break
                except E.BrokerError as e:
                    await backoff.wait(e)
            if self._stopping:
                return
            await self._heartbeat_once()  # a started worker is registered: SDK submit checks pass at once
            self._running = True
            log.info("worker %s serving %s (version %s) max_batch=%d lease_s=%.1f", self.consumer,
                     self.settings.model, self.servable.version, self.settings.max_batch, self.settings.lease_s)
            spawn = asyncio.get_running_loop().create_task
            readers = [spawn(self._read_loop(), name="read"), spawn(self._claim_loop(), name="claim")]
            infer = [spawn(self._infer_loop(r), name=f"infer-{k}") for k, r in enumerate(self._runners)]
            writer = spawn(self._write_loop(), name="write")
            maint = [spawn(self._lease_loop(), name="lease"), spawn(self._maintenance_loop(), name="maint")]
            self._tasks = [*readers, *infer, writer, *maint]
            await self._stop_event.wait()
            if self._drain:
                # asyncio.wait, not wait_for: on timeout we must not block on cancelling it.
                drain = spawn(self._drain_pipeline(readers, infer, writer), name="drain")
                self._tasks.append(drain)
                done, _ = await asyncio.wait({drain}, timeout=self.settings.drain_timeout_s)
                if not done:
                    log.warning("drain timed out after %.1fs; %d entries stay pending for other workers",
                                self.settings.drain_timeout_s, len(self._in_flight))
            if self.stuck is not None:
                await self._hand_back()
            await self._end_tasks()
            await self._leave()
        finally:
            self._running = False
            for runner in self._runners:
                runner.close()
            await self.broker.close()
            self._finished.set()
            log.info("worker %s stopped: %s", self.consumer, dict(self._counters))

    async def stop(self, drain: bool = True) -> None:
        """Stop reading; with ``drain`` finish and ack in-flight work (up to
        ``drain_timeout_s``), else abandon it to be reclaimed after the lease. Returns when
        the loop has ended. Safe to call more than once."""
        self._drain = self._drain and drain
        self._stopping = True
        # Wake the reader if it waits for room; the batcher itself is closed only once the
        # readers are done, so entries returned by a read still in flight get run too.
        self._batcher.wake()
        if not self._drain:
            self._batcher.close()
        if self._stop_event is None or self._finished is None:
            return
        self._stop_event.set()
        await self._finished.wait()

    def healthy(self) -> bool:
        """True while the loop runs, every task is alive and Redis answered recently."""
        if not self._running or self._stopping or self.stuck is not None:
            return False
        if any(t.done() for t in self._tasks):
            return False
        recent = time.monotonic() - self._last_ok_s < max(10.0, 3 * self.settings.block_ms / 1000.0)
        return self._redis_ok and recent

    def reconfigure(self, **changes: Any) -> None:
        """Change ``max_batch``, ``preferred_batch`` and/or ``max_wait_ms`` live.

        Raises:
            ConfigError: another setting was named, or a value is invalid.
        """
        unknown = set(changes) - RECONFIGURABLE
        if unknown:
            raise E.ConfigError(f"cannot reconfigure {sorted(unknown)} live; only {sorted(RECONFIGURABLE)}")
        self.settings = self.settings.replace(**changes)
        self._batcher.configure(max_batch=self.settings.max_batch, preferred_batch=self.settings.preferred_batch,
                                max_wait_ms=self.settings.max_wait_ms)
        log.info("worker %s reconfigured: %s", self.consumer, changes)

    def stats(self) -> dict[str, Any]:
        """Counters for status and autoscaling (a snapshot; plain JSON-able values)."""
        c = self._counters
        return {
            "consumer": self.consumer, "model": self.settings.model, "version": self.servable.version,
            "running": self._running, "healthy": self.healthy(), "in_flight": len(self._in_flight),
            "queued": len(self._batcher), "max_batch": self.settings.max_batch, "instances": self.settings.instances,
            "preferred_batch": self.settings.effective_preferred_batch, "max_wait_ms": self.settings.max_wait_ms,
            "avg_batch": (c["batched_requests"] / c["batches"]) if c["batches"] else 0.0, **dict(c),
        }

    # --- helpers -----------------------------------------------------------------------------

    def _backoff(self, what: str, wake_on_stop: bool = True) -> Backoff:
        """``wake_on_stop``: a stop request ends the wait (loops that exit when stopping);
        the writer keeps its pace while draining instead of spinning on a dead connection."""
        return Backoff(what, self._redis_state, self._sleep if wake_on_stop else asyncio.sleep)

    def _redis_state(self, ok: bool) -> None:
        self._redis_ok = ok
        if ok:
            self._last_ok_s = time.monotonic()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake early when stopping."""
        assert self._stop_event is not None
        await wait_event(self._stop_event, seconds)

    def _emit(self, unit: Unit) -> None:
        if unit.ops:
            assert self._commits is not None
            self._commits.put_nowait(unit)

    # --- admission ---------------------------------------------------------------------------

    async def _admit(self, entries: Sequence[Entry]) -> None:
        """Decode and check entries (one dedupe pre-check round trip for all of them);
        answer what cannot run, queue the rest for batching."""
        unit = Unit()
        at = now_ms()
        routed: list[tuple[Entry, Envelope]] = []
        for entry in entries:
            if entry.entry_id in self._in_flight:
                continue  # our own entry, re-claimed after a late lease refresh: already on its way
            self._in_flight[entry.entry_id] = entry
            self._counters["read"] += 1
            try:
                routed.append((entry, decode_envelope(entry.fields)))
            except E.HeadraceError as err:
                self._admission.undecodable(entry, err, unit)
        ids = [env.request_id for _, env in routed]
        # Dedupe pre-check and cancel markers, side by side (one round trip of latency).
        done, cancel_ms = await asyncio.gather(self.broker.answered(ids), self.broker.cancel_marks(ids),
                                               return_exceptions=True)
        if isinstance(done, BaseException) or isinstance(cancel_ms, BaseException):
            # The commit script dedupes anyway; the pre-check only saves running them, and
            # a missed cancel only means running a request for nobody.
            log.debug("dedupe/cancel pre-check skipped: %s", done if isinstance(done, BaseException) else cancel_ms)
            done, cancel_ms = [False] * len(routed), [0] * len(routed)
        for (entry, env), answered, cancelled in zip(routed, done, cancel_ms, strict=True):
            work = self._admission.admit(entry, env, answered, at, unit, cancelled_ms=cancelled)
            if work is not None:
                self._batcher.put(work, work.length)
        self._emit(unit)

    # --- loops -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = self._backoff("XREADGROUP")
        while not self._stopping:
            try:
                await self._batcher.wait_for_room(self.settings.max_batch, until=lambda: self._stopping)
                if self._stopping:
                    break
                room = max(1, self.settings.max_batch - len(self._batcher))
                entries = await self.broker.read(room, self.settings.block_ms)
                backoff.ok()
                if entries:
                    await self._admit(entries)
            except E.BrokerError as e:
                await backoff.wait(e)
            except Exception as e:  # noqa: BLE001 - keep serving; this is a bug to log, not a reason to die
                log.exception("read loop error")
                await backoff.wait(e)

    async def _claim_loop(self) -> None:
        backoff = self._backoff("XAUTOCLAIM")
        lease_ms = int(self.settings.lease_s * 1000)
        while not self._stopping:
            try:
                entries = await self.broker.claim_abandoned(lease_ms, self.settings.max_batch)
                backoff.ok()
                if entries:
                    self._counters["claimed"] += len(entries)
                    log.info("claimed %d abandoned entries (e.g. %s, %d deliveries)", len(entries),
                             entries[0].entry_id, entries[0].deliveries)
                    await self._admit(entries)
                if len(entries) >= self.settings.max_batch:
                    # A dead worker left more behind: take the next batch as soon as there is
                    # room, rather than one batch per lease_s / 2.
                    await self._batcher.wait_for_room(self.settings.max_batch, until=lambda: self._stopping)
                else:
                    await self._sleep(self.settings.lease_s / 2)
            except E.BrokerError as e:
                await backoff.wait(e)
            except Exception as e:  # noqa: BLE001
                log.exception("claim loop error")
                await backoff.wait(e)

    async def _lease_loop(self) -> None:
        backoff = self._backoff("lease refresh")
        while not self._shutdown:
            await asyncio.sleep(self.settings.lease_s / 3)
            ids = list(self._in_flight)
            if not ids:
                continue
            try:
                owned = set(await self.broker.refresh_lease(ids))
                backoff.ok()
            except E.BrokerError as e:
                await backoff.wait(e)
                continue
            for lost in (i for i in ids if i not in owned and i in self._in_flight and i not in self._committing):
                # Claimed by another worker (we were stalled past the lease); its answer or
                # ours wins the dedupe marker, so stop renewing it.
                log.warning("lease lost on entry %s; another worker owns it now", lost)
                self._in_flight.pop(lost, None)
                self._counters["leases_lost"] += 1

    def _registry_facts(self) -> dict[str, Any]:
        """This worker's entry in the model registry (read by ``headrace.client.registry``):
        also the backlog it last read and the p50/p99 submit-to-result latency (ms) of the
        requests it answered lately (``client.model_status``)."""
        recent = sorted(self._recent_ms)
        p50 = recent[len(recent) // 2] if recent else 0.0
        p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))] if recent else 0.0
        return {"version": self.servable.version, "backend": type(self.servable).__name__,
                "max_batch": self.settings.max_batch, "preferred_batch": self.settings.preferred_batch,
                "max_wait_ms": self.settings.max_wait_ms, "host": socket.gethostname(), "pid": os.getpid(),
                "lag": self._backlog[0], "pending": self._backlog[1], "p50_ms": round(p50, 3),
                "p99_ms": round(p99, 3)}

    def _describe(self) -> dict[str, Any] | None:
        try:
            return self.servable.describe()
        except Exception:  # noqa: BLE001 - the description is informational only
            return None

    async def _heartbeat_once(self) -> None:
        try:
            await self.broker.heartbeat(self._registry_facts(), self._describe(),
                                        stale_ms=int(max(30.0, 5 * HEARTBEAT_S) * 1000))
        except E.BrokerError as e:
            log.warning("first registry heartbeat failed (%s); the maintenance loop retries", e)

    async def _maintenance_loop(self) -> None:
        backoff = self._backoff("maintenance")
        next_trim = time.monotonic()
        describe = self._describe()
        while not self._shutdown:
            try:
                await self.broker.heartbeat(self._registry_facts(), describe,
                                            stale_ms=int(max(30.0, 5 * HEARTBEAT_S) * 1000))
                bl = await self.broker.backlog()
                self._backlog = (bl.lag, bl.pending)
                self.metrics.set_backlog(bl.lag, bl.pending)
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + self.settings.trim_interval_s
                    trimmed = await self.broker.trim()
                    self._counters["trimmed"] += trimmed
                    gone = await self.broker.delete_idle_consumers(consumer_idle_delete_ms(self.settings))
                    if gone:
                        log.info("deleted idle consumers with nothing pending: %s", gone)
                backoff.ok()
            except E.BrokerError as e:
                await backoff.wait(e)
                continue
            except Exception:  # noqa: BLE001
                log.exception("maintenance error")
            await asyncio.sleep(min(HEARTBEAT_S, self.settings.trim_interval_s))

    async def _infer_loop(self, runner: BatchRunner) -> None:
        while not self._shutdown:
            batch = await self._batcher.next_batch()
            if batch is None:
                return
            unit = Unit()
            try:
                await runner.run_batch(batch, unit)
                self._emit(unit)
            except E.ModelTimeoutError as err:
                # The call cannot be interrupted and holds its inference thread: commit
                # what finished, stop consuming (drain flushes the writer, then the entries
                # never run are handed back, see run()). The stuck call's own entries keep
                # their delivery: after lease_s another worker runs each of them alone, and
                # one that hangs every worker reaches the DLQ after max_deliveries.
                self._emit(unit)
                log.error("%s; this worker stops (unhealthy); requests of that call are retried by other "
                          "workers after lease_s=%.1f", err, self.settings.lease_s)
                self._counters["infer_timeouts"] += 1
                self.stuck = err
                for w in runner.running:
                    self._in_flight.pop(w.entry.entry_id, None)
                stopper = asyncio.get_running_loop().create_task(self.stop(drain=True))
                self._background.add(stopper)
                stopper.add_done_callback(self._background.discard)
                return
            except Exception:  # noqa: BLE001 - release the batch for redelivery rather than die
                log.exception("batch of %d failed outside the model; releasing for redelivery", len(batch))
                for w in batch:
                    self._in_flight.pop(w.entry.entry_id, None)

    async def _write_loop(self) -> None:
        assert self._commits is not None
        backoff = self._backoff("commit", wake_on_stop=False)
        last = False
        while not last:
            first = await self._commits.get()
            if first is None:
                return
            units = [first]
            n_ops = len(first.ops)
            while not self._commits.empty() and n_ops < MAX_COMMIT_OPS:
                nxt = self._commits.get_nowait()
                if nxt is None:
                    last = True
                    break
                units.append(nxt)
                n_ops += len(nxt.ops)
            ops = [op for u in units for op in u.ops]
            self._committing.update(op.entry_id for op in ops)
            while True:
                at = now_ms()
                stats = [u.stats_line(self.consumer, at) for u in units]
                try:
                    outcomes = await self.broker.commit(ops, stats)
                    backoff.ok()
                    break
                except E.BrokerError as e:
                    if self._shutdown:
                        log.warning("giving up on writing %d results at shutdown; their entries stay "
                                    "pending and are redelivered after the lease", len(ops))
                        return
                    await backoff.wait(e)
            self._after_commit(units, outcomes, now_ms())
            self._committing.clear()

    def _after_commit(self, units: Sequence[Unit], outcomes: Sequence[int], at: int) -> None:
        metas = [m for u in units for m in u.meta]
        ops = [op for u in units for op in u.ops]
        for op, meta, outcome in zip(ops, metas, outcomes, strict=True):
            self._in_flight.pop(op.entry_id, None)
            if meta is None:
                continue
            if outcome == DUPLICATE:
                self._counters["duplicates"] += 1
                continue
            if outcome == UNWRITABLE:
                self._counters["unwritable_reply"] += 1
                log.warning("reply stream of entry %s is not writable; moved to the DLQ", op.entry_id)
                continue
            self._counters[f"answered_{meta.status}"] += 1
            if isinstance(op, DeadLetterOp):
                self._counters["dead_lettered"] += 1
            total_s = max(0.0, (at - meta.ts_ms) / 1000.0) if meta.ts_ms else 0.0
            self.metrics.observe_request(meta.status, meta.code, meta.queue_s, total_s)
            if meta.ts_ms:
                self._recent_ms.append(total_s * 1000.0)

    # --- shutdown ----------------------------------------------------------------------------

    async def _drain_pipeline(self, readers: list[asyncio.Task[None]], infer: list[asyncio.Task[None]],
                              writer: asyncio.Task[None]) -> None:
        # Readers finish their current (blocking, <= block_ms) call and admit what it
        # returned; then the batcher hands out the rest, inference ends, the writer flushes.
        await asyncio.gather(*readers, return_exceptions=True)
        log.debug("drain: readers done, %d queued, %d in flight", len(self._batcher), len(self._in_flight))
        self._batcher.close()
        await asyncio.gather(*infer)
        log.debug("drain: inference done")
        assert self._commits is not None
        self._commits.put_nowait(None)
        await writer
        log.debug("drain: results written, %d in flight", len(self._in_flight))

    async def _end_tasks(self) -> None:
        # On Python < 3.12 a cancellation can be lost inside redis-py (its asyncio.wait_for
        # around socket writes drops a cancel that races the write's completion, CPython
        # gh-86296) and the task just carries on with its loop: so every loop also checks
        # _shutdown, and this wait is bounded.
        self._shutdown = True
        self._batcher.close()
        for t in self._tasks:
            t.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=5.0)
        for t in stuck:
            log.warning("task %s did not end within 5 s of shutdown; abandoning it", t.get_name())

    async def _hand_back(self) -> None:
        """Release the entries read but never run (a stuck model call stopped the worker),
        so other workers take them at once without counting this delivery."""
        unrun = [e for i, e in self._in_flight.items() if i not in self._committing]
        if not unrun:
            return
        try:
            done = await self.broker.release(unrun, int(self.settings.lease_s * 1000))
            log.info("handed back %d entries never run (e.g. %s)", len(done), unrun[0].entry_id)
            for entry_id in done:
                self._in_flight.pop(entry_id, None)
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


# WorkerThread lives in its own module; re-exported here as part of the worker contract.
from headrace.workers.engine.thread import WorkerThread  # noqa: E402

__all__ = ["StreamWorker", "WorkerThread", "consumer_idle_delete_ms"]
