"""Running batches: model calls off the event loop, failure isolation, results as ops.

:class:`BatchRunner` is the inference stage of a :class:`~headrace.workers.engine.worker.StreamWorker`.
Model calls run on a dedicated daemon thread (ONNX Runtime and torch release the GIL, so
the event loop keeps reading and committing meanwhile). A batch becomes one or more model
calls: text is cut into length buckets, and the servable's :meth:`~Servable.plan` splits
what it cannot run together (different shapes, its own largest batch); each request's
``timings.batch_size`` is the size of the call it ran in (in samples).

A servable that runs stacked samples (:meth:`~Servable.runs_stacked`) gets one
:meth:`~Servable.infer_stacked` call per input signature instead: the blocks of multi-sample
entries (one array per input) and single samples concatenated on the leading axis, the
outputs cut back into row ranges. A failing call of several blocks is split between them,
and a failing block in halves, down to the one sample that fails.

A call that raises is split in halves (bisection; from :data:`~headrace.workers.engine.calls.SPLIT_ABOVE` requests down,
one request at a time) until the failing request runs alone, so its batch-mates are still
answered; the failing request is released for redelivery (or
dead-lettered after ``max_deliveries``), unless the model refused its inputs
(:class:`~headrace.client.errors.ModelInputError`, also raised for a batched output whose rows
do not match the call's samples, which the same inputs repeat): that is answered
``model_error`` at once. A model call that runs past ``infer_timeout_s``
is interrupted when the servable can (:meth:`~Servable.interrupt`: onnxruntime's terminate
flag) and then fails like any call: split to find the request that hangs it, which is
dead-lettered alone, not retried. One that cannot be interrupted raises
:class:`~headrace.client.errors.ModelTimeoutError` to the worker, which stops consuming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from headrace.client import errors as E
from headrace.client.protocol import STATUS_EXPIRED, STATUS_OK, Result, Timings, now_ms
from headrace.client.wire import take_row
from headrace.workers.backends.base import Servable, call_cap, runs_stacked
from headrace.workers.engine.batcher import split_by_length
from headrace.workers.engine.calls import (
    cut_calls,
    infer_text_buckets,
    isolation_parts,
    row_signature,
    stack_rows,
    text_rows,
)
from headrace.workers.engine.daemon import DaemonExecutor
from headrace.workers.pipeline.answers import Answers
from headrace.workers.pipeline.entry import elapsed_ms
from headrace.workers.pipeline.work import Call, Unit, Work
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how long an interrupted model call may take to end (seconds) before the worker takes its
#: thread for stuck.
INTERRUPT_GRACE_S = 10.0


class Late:
    """What happened to one model call past ``infer_timeout_s``."""

    __slots__ = ("grace", "interrupted", "stuck")

    def __init__(self) -> None:
        self.interrupted = False
        self.stuck = False
        self.grace: asyncio.TimerHandle | None = None


class BatchRunner:
    """Run batches of admitted work and turn the outcomes into commit ops.

    Args:
        settings: the worker's settings (``max_deliveries``, ``infer_timeout_s``, model name).
        servable: the loaded model.
        answers: builds result / error / dead-letter ops.
        index: which of the worker's ``instances`` this runner is (names its thread).
    """

    def __init__(self, settings: WorkerSettings, servable: Servable, answers: Answers, index: int = 0) -> None:
        self.settings = settings
        self.servable = servable
        self.answers = answers
        self.thread = DaemonExecutor(f"headrace-infer-{settings.model}-{index}")
        #: the requests of the model call in progress (or the last one).
        self.running: list[Work] = []
        self.stacked = runs_stacked(servable)
        #: the servable's largest model call in samples (0 = no limit of its own): stacked
        #: calls are cut to it here, so each sample's timings.batch_size is its real call.
        self.cap = call_cap(servable)

    async def run_batch(self, batch: Sequence[Work], unit: Unit) -> list[Work]:
        """Run ``batch`` and add the ops to commit to ``unit`` (and its model calls to
        ``unit.calls``). Requests past their deadline are answered without running;
        redelivered ones (their batch killed or wedged a worker) run alone.

        Returns:
            The requests that failed on a delivery before ``max_deliveries``: the caller
            stops holding them, so they are redelivered after ``lease_s``.

        Raises:
            ModelTimeoutError: one model call ran past ``infer_timeout_s`` (it may still be
                running in the inference thread; :attr:`running` holds its requests, and
                ``unit`` what finished before it).
        """
        at = now_ms()
        released: list[Work] = []
        live: list[Work] = []
        for w in batch:
            env = w.request.envelope
            if not env.expired(at):
                live.append(w)
            elif w.group is not None:
                self._fill(w, w.group.fail(w.index, E.DEADLINE_EXCEEDED, "deadline passed while queued in the worker",
                                           status=STATUS_EXPIRED, count=w.count), unit)
            else:
                self.answers.error(env, w.entry, E.DEADLINE_EXCEEDED, "deadline passed while queued in the worker",
                                   unit, status=STATUS_EXPIRED, read_ms=w.read_ms)
        fresh = [w for w in live if w.entry.deliveries <= 1]
        for call in self._plan(fresh):
            await self._run_call(call, unit, released)
        # Redelivered entries (their batch may have killed a worker) run apart from the
        # others: a single sample alone, the samples of one multi-sample entry together.
        again: dict[str, list[Work]] = {}
        for w in live:
            if w.entry.deliveries > 1:
                again.setdefault(w.entry.entry_id, []).append(w)
        for works in again.values():
            for call in self._plan(works) if works[0].group is not None else [works]:
                await self._run_call(call, unit, released)
        return released

    def _fill(self, w: Work, completed: bool, unit: Unit) -> None:
        """Answer ``w``'s multi-sample entry when ``completed`` (its last slot was filled);
        outputs that cannot be encoded answer the entry ``model_error``."""
        if not completed or w.group is None:
            return
        try:
            self.answers.reply_group(w.group, unit)
        except Exception as err:  # noqa: BLE001 - one entry's outputs fail that entry only
            log.exception("encoding the result of request %s failed", w.group.envelope.request_id)
            self.answers.error(w.group.envelope, w.entry, E.MODEL_ERROR,
                               f"cannot encode the model outputs: {type(err).__name__}: {err}", unit,
                               read_ms=w.read_ms)

    def _plan(self, works: list[Work]) -> list[list[Work]]:
        """The model calls of ``works``: length buckets (text), then the servable's plan; for
        a servable that runs stacked samples, one call per input signature."""
        if not works:
            return []
        if self.stacked:
            same: dict[tuple[Any, ...], list[Work]] = {}
            for w in works:
                same.setdefault(row_signature(w), []).append(w)
            return [call for group in same.values() for call in cut_calls(group, self.cap)]
        buckets = (split_by_length([w.length for w in works]) if self.servable.accepts_text
                   else [list(range(len(works)))])
        calls: list[list[Work]] = []
        for bucket in buckets:
            members = [works[i] for i in bucket]
            calls.extend([members[i] for i in idx] for idx in self._servable_plan(members))
        return [c for c in calls if c]

    def _servable_plan(self, works: list[Work]) -> list[list[int]]:
        n = len(works)
        try:
            plan = [list(idx) for idx in self.servable.plan([w.request for w in works])]
        except Exception:  # noqa: BLE001 - a plan is an optimisation: fall back to one call
            log.exception("servable plan failed; running the batch as one call")
            return [list(range(n))]
        if sorted(i for idx in plan for i in idx) != list(range(n)):
            log.error("servable plan %s is not a partition of %d requests; running them as one call", plan, n)
            return [list(range(n))]
        return plan

    async def _in_thread(self, works: Sequence[Work], fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the inference thread, bounded by ``infer_timeout_s``.

        Past the limit the servable is asked to :meth:`~Servable.interrupt` the call; one that
        can has :data:`INTERRUPT_GRACE_S` to end it.

        Raises:
            ModelTimeoutError: past ``infer_timeout_s``; ``interrupted`` when the call ended
                on the servable's interrupt (the thread is free again), else it may still be
                running.
        """
        self.running = list(works)
        call = self.thread.start(fn, *args)
        limit_s = self.settings.infer_timeout_s
        if limit_s <= 0:
            return await call
        # Timers rather than asyncio.wait_for: a timeout must not cancel the call's future
        # before the interrupted call has ended, or its outcome (and the free thread) is lost.
        late = Late()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(limit_s, self._late, call, late, loop)
        try:
            return await call
        except Exception as err:
            if not late.interrupted:
                raise
            n = sum(w.count for w in works)
            raise E.ModelTimeoutError(
                f"model call on {n} samples ran past infer_timeout_s={limit_s:g}s and was stopped",
                interrupted=True) from err
        finally:
            timer.cancel()
            if late.grace is not None:
                late.grace.cancel()
            if late.interrupted and call.done() and not late.stuck:
                self.servable.resume()

    def _late(self, call: asyncio.Future[Any], late: Late, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop, ``infer_timeout_s`` after a call started that has not ended."""
        if call.done():
            return
        try:
            late.interrupted = bool(self.servable.interrupt())
        except Exception:  # noqa: BLE001 - a servable's interrupt that fails is one that cannot
            log.exception("interrupting the model call failed")
        if late.interrupted:
            log.warning("a model call ran past infer_timeout_s=%gs; interrupting it",
                        self.settings.infer_timeout_s)
            late.grace = loop.call_later(INTERRUPT_GRACE_S, self._stuck, call, late)
        else:
            self._stuck(call, late)

    def _stuck(self, call: asyncio.Future[Any], late: Late) -> None:
        if call.done():
            return
        late.stuck = True
        works = self.running
        n = sum(w.count for w in works)
        call.set_exception(E.ModelTimeoutError(
            f"model call on {n} samples (e.g. {works[0].request.envelope.request_id}) still running after "
            f"infer_timeout_s={self.settings.infer_timeout_s:g}s" + (
                f" and {INTERRUPT_GRACE_S:g}s after it was interrupted" if late.interrupted else
                " (the servable cannot interrupt it)")))

    async def _call_model(self, works: Sequence[Work]) -> list[dict[str, Any]]:
        """One output map per work (a block's holds its rows)."""
        if self.stacked:
            return await self._call_stacked(works)
        reqs = [w.request for w in works]
        outs = await self._in_thread(works, self.servable.infer, reqs)
        if not isinstance(outs, list) or len(outs) != len(reqs) or not all(isinstance(o, dict) for o in outs):
            n = len(outs) if hasattr(outs, "__len__") else "?"
            raise E.ModelError(f"servable returned {type(outs).__name__} of {n} items for {len(reqs)} requests; "
                               "expected one output map per request")
        return outs

    async def _call_stacked(self, works: Sequence[Work]) -> list[dict[str, Any]]:
        ids: list[str] = []
        for w in works:
            ids.extend([w.request.envelope.request_id] * w.count)
        if self.servable.accepts_text:
            texts, lengths = text_rows(works)
            outs = await self._in_thread(works, infer_text_buckets, self.servable, texts, ids,
                                         split_by_length(lengths))
        else:
            outs = await self._in_thread(works, self.servable.infer_stacked, stack_rows(works), ids)
        rows = len(ids)
        if not isinstance(outs, dict) or not all(isinstance(v, np.ndarray) and v.ndim for v in outs.values()):
            got = {k: list(np.shape(v)) for k, v in outs.items()} if isinstance(outs, dict) else type(outs).__name__
            raise E.ModelError(f"servable returned {got} for {rows} stacked samples; expected a map of arrays with "
                               f"{rows} rows each")
        short = {k: list(v.shape) for k, v in outs.items() if len(v) != rows}
        if short:
            # The model's own answer to these inputs: run again, they give the same rows, so
            # it is answered at once (split first, to answer the call-mates that fit).
            raise E.ModelInputError(f"output(s) {short} do not hold one row per sample ({rows} stacked); their "
                                    "length is set by the values, not the batch: add the model again (models add "
                                    "serves such outputs whole, one request per call) or mark them --output "
                                    "NAME:DTYPE:SHAPE:nobatch")
        out: list[dict[str, Any]] = []
        at = 0
        for w in works:
            if w.block:
                out.append({k: v[at:at + w.count] for k, v in outs.items()})
            else:
                out.append({k: take_row(v, at) for k, v in outs.items()})
            at += w.count
        return out

    async def _run_call(self, works: list[Work], unit: Unit, released: list[Work], depth: int = 0) -> None:
        # depth: how many splits led here; only the first failure of a call is logged as a
        # warning (a 1024-sample entry of bad samples is ~2000 calls on the way down).
        t0 = time.perf_counter()
        try:
            outs = await self._call_model(works)
        except Exception as err:  # noqa: BLE001 - isolate the failing request(s) below
            if isinstance(err, E.ModelTimeoutError) and not err.interrupted:
                raise  # the thread is stuck: isolating would queue behind it
            if len(works) == 1 and works[0].count == 1:
                self._failed(works[0], err, unit, released)
                return
            log.log(logging.WARNING if depth == 0 else logging.DEBUG,
                    "model call on %d requests failed (%s); splitting it to isolate the cause",
                    sum(w.count for w in works), err)
            for part in isolation_parts(works):
                await self._run_call(part, unit, released, depth + 1)
            return
        infer_s = time.perf_counter() - t0
        size = sum(w.count for w in works)
        unit.calls.append(Call(size, infer_s))
        # Each multi-sample entry counts this call once, however many of its samples ran in it.
        for group in {id(w.group): w.group for w in works if w.group is not None}.values():
            group.ran(infer_s, size)
        for w, out in zip(works, outs, strict=True):
            self._answer(w, out, infer_s, size, unit)

    def _answer(self, w: Work, out: dict[str, Any], infer_s: float, size: int, unit: Unit) -> None:
        env = w.request.envelope
        if w.block and w.group is not None:
            self._fill(w, w.group.fill_block(w.index, w.count, out), unit)
            return
        if w.group is not None:
            self._fill(w, w.group.fill(w.index, Result(env.request_id, STATUS_OK, out)), unit)
            return
        queue_ms = elapsed_ms(w.read_ms, env.ts_ms)
        res = Result(env.request_id, STATUS_OK, out, model=self.settings.model, version=self.servable.version,
                     timings=Timings(queue_ms, infer_s * 1000, size, self.answers.consumer))
        try:
            self.answers.reply(env, w.entry, res, unit, queue_ms / 1000)
        except E.HeadraceError as err:  # e.g. an output dtype that is not a wire dtype
            self.answers.error(env, w.entry, E.MODEL_ERROR, f"cannot encode the model output: {err.message}", unit,
                               read_ms=w.read_ms)
        except Exception as err:  # noqa: BLE001 - an output the encoder chokes on fails this request only
            log.exception("encoding the result of request %s failed", env.request_id)
            self.answers.error(env, w.entry, E.MODEL_ERROR,
                               f"cannot encode the model output: {type(err).__name__}: {err}", unit, read_ms=w.read_ms)

    def _failed(self, w: Work, err: BaseException, unit: Unit, released: list[Work]) -> None:
        entry, env = w.entry, w.request.envelope
        if w.group is not None:
            # One result answers all samples of the entry: a sample the model fails on even
            # alone is answered model_error in its slot; its entry-mates keep their outputs.
            # One warning per entry: its other failing samples fail the same way, most likely.
            log.log(logging.DEBUG if w.group.warned else logging.WARNING,
                    "request %s: the model failed on sample %d alone: %s%s", env.request_id, w.index, err,
                    "" if w.group.warned else " (its other failing samples are logged at DEBUG)")
            w.group.warned = True
            self._fill(w, w.group.fail(w.index, E.MODEL_ERROR, f"model failed on sample {w.index}: "
                                       f"{type(err).__name__}: {err}"), unit)
            return
        if isinstance(err, E.ModelInputError):
            # The model refused this request's own inputs, alone: a retry would fail the same.
            log.warning("request %s: the model refused its inputs: %s", env.request_id, err)
            self.answers.error(env, entry, E.MODEL_ERROR, f"the model refused the inputs: {err.message}", unit,
                               read_ms=w.read_ms)
            return
        if isinstance(err, E.ModelTimeoutError):
            # Retried, it would hold the next worker's model for infer_timeout_s again.
            log.warning("request %s: the model call ran past infer_timeout_s alone; dead-lettered", env.request_id)
            self.answers.dead_letter(entry, env, E.MODEL_ERROR, f"{err.message} (alone: not retried)", unit,
                                     reply_code=E.MODEL_ERROR)
            return
        if entry.deliveries >= self.settings.max_deliveries:
            self.answers.dead_letter(entry, env, E.MODEL_ERROR, f"model failed on each of {entry.deliveries} "
                                     f"deliveries; last: {type(err).__name__}: {err}", unit)
            return
        # Leave it pending and stop renewing its lease: after lease_s some worker reclaims it
        # (delivery count + 1) and tries again, until max_deliveries sends it to the DLQ.
        released.append(w)
        log.warning("request %s failed on delivery %d/%d, will be retried after the lease: %s",
                    env.request_id, entry.deliveries, self.settings.max_deliveries, err)

    def blame_stuck(self, err: E.ModelTimeoutError, unit: Unit) -> bool:
        """After a call that cannot be stopped: when it ran the samples of one entry only,
        that entry hung the model by itself, so answer it now (dead-lettered ``model_error``;
        a multi-sample entry answers each sample not yet answered ``model_error``) instead of
        leaving it to hang the next worker. True when it was answered (``unit`` holds the op).
        """
        if len({w.entry.entry_id for w in self.running}) != 1:
            return False
        w = self.running[0]
        why = f"{err.message}; it ran alone, so it is not retried (it would hang the next worker too)"
        if w.group is None:
            self.answers.dead_letter(w.entry, w.request.envelope, E.MODEL_ERROR, why, unit, reply_code=E.MODEL_ERROR)
            return True
        if w.group.answered or w.group.complete:
            return False
        done = False
        for i, slot in enumerate(w.group.slots):
            if slot is None:
                done = w.group.fail(i, E.MODEL_ERROR, why) or done
        self._fill(w, done, unit)
        return True

    def close(self) -> None:
        """Let the inference thread go (without waiting: a stuck model call cannot be joined)."""
        self.thread.shutdown()
