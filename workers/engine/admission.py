"""Admission of request entries and the answers the worker writes.

:class:`Answers` turns outcomes into broker ops (result replies, error replies, dead
letters) grouped in a :class:`Unit` (what one commit script call writes for one batch);
:class:`Admission` decides, per delivered entry, whether it can run or is answered at once:
already answered (ack only), cancelled by its producer (ack only, unanswered), delivered too
often (DLQ), another model, past its deadline, undecodable body, bad dtype/shape/value. None of
these outcomes ever raises.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from headrace.client import errors as E
from headrace.client.keys import ModelKeys
from headrace.client.protocol import (
    STATUS_ERROR,
    STATUS_EXPIRED,
    STATUS_OK,
    Envelope,
    Request,
    Result,
    Status,
    Timings,
    decode_body,
    decode_envelope,
    encode_result,
    error_result,
    now_ms,
)
from headrace.workers.backends.base import Servable
from headrace.workers.backends.validate import check_finite
from headrace.workers.broker.redis_broker import Ack, BatchStats, DeadLetterOp, Entry, Op, Reply
from headrace.workers.metrics import CANCELLED, NullMetrics, WorkerMetrics
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Work:
    """A checked request waiting for (or in) a batch; ``read_ms`` is when it was read;
    ``length`` the servable's batching cost hint (computed once, at admission)."""

    entry: Entry
    request: Request
    read_ms: int
    length: int = 0


@dataclass(frozen=True)
class Meta:
    """What the writer reports for an op once it is committed (``ts_ms``: producer's submit
    time, 0 when unknown; ``queue_s``: submit to batch)."""

    status: str
    code: str
    ts_ms: int
    queue_s: float


@dataclass
class Unit:
    """Ops of one batch (or one admission round), committed together."""

    ops: list[Op] = field(default_factory=list)
    meta: list[Meta | None] = field(default_factory=list)
    batch: int = 0
    infer_ms: float = 0.0

    def add(self, op: Op, meta: Meta | None) -> None:
        self.ops.append(op)
        self.meta.append(meta)

    def stats_line(self, worker: str, at_ms: int) -> BatchStats:
        """This unit's line of the stats stream, latencies measured up to ``at_ms``."""
        answered = [m for m in self.meta if m is not None]
        ok = sum(1 for m in answered if m.status == STATUS_OK)
        lat = [float(at_ms - m.ts_ms) for m in answered if m.ts_ms]
        return BatchStats(worker, self.batch, ok, len(answered) - ok, round(self.infer_ms, 3), lat)


def route_of(fields: Any) -> tuple[str, str] | None:
    """(request_id, reply_to) of an entry whose envelope failed to decode, when both are
    still usable (so the producer can be told what was wrong), else None."""
    try:
        env = decode_envelope({**fields, b"v": b"1", b"deadline_ms": b"0", b"ts_ms": b"0"})
    except E.HeadraceError:
        return None
    return env.request_id, env.reply_to


class Answers:
    """Builds the ops that answer requests, stamped with model, version and worker name."""

    def __init__(self, model: str, version: str, consumer: str) -> None:
        self.model, self.version, self.consumer = model, version, consumer

    def reply(self, env: Envelope, entry: Entry, res: Result, unit: Unit, queue_s: float = 0.0) -> None:
        """Queue ``res`` for the producer.

        Raises:
            InvalidTensorError: an output has a dtype that is not a wire dtype.
        """
        op = Reply(entry.entry_id, env.request_id, env.reply_to, encode_result(res))
        unit.add(op, Meta(res.status, res.code, env.ts_ms, queue_s))

    def error(self, env: Envelope, entry: Entry, code: str, message: str, unit: Unit,
              status: Status = STATUS_ERROR) -> None:
        log.debug("request %s answered %s/%s: %s", env.request_id, status, code, message)
        # Queue time up to this answer: the producer sent ts_ms, and a refusal waited too.
        queue_ms = max(0.0, float(now_ms() - env.ts_ms)) if env.ts_ms else 0.0
        res = error_result(env.request_id, code, message, status=status, model=self.model,
                           version=self.version, timings=Timings(queue_ms=queue_ms, worker=self.consumer))
        self.reply(env, entry, res, unit, queue_ms / 1000)

    def dead_letter(self, entry: Entry, env: Envelope | None, code: str, reason: str, unit: Unit,
                    reply_code: str = E.MAX_DELIVERIES) -> None:
        """Queue moving ``entry`` to the DLQ; the producer (when known) gets ``reply_code``."""
        reply = None
        if env is not None:
            reply = encode_result(error_result(env.request_id, reply_code, reason, model=self.model,
                                               version=self.version, timings=Timings(worker=self.consumer)))
        op = DeadLetterOp(entry.entry_id, entry.fields, reason, code, entry.deliveries,
                          env.request_id if env else None, env.reply_to if env else None, reply)
        unit.add(op, Meta(STATUS_ERROR, reply_code if env else code, env.ts_ms if env else 0, 0.0))
        log.warning("dead-lettering entry %s (request %s) after %d deliveries: %s", entry.entry_id,
                    env.request_id if env else "?", entry.deliveries, reason)


class Admission:
    """Per-entry admission decisions (see module doc)."""

    def __init__(self, settings: WorkerSettings, servable: Servable, answers: Answers,
                 counters: Counter[str], metrics: WorkerMetrics | None = None) -> None:
        self.settings, self.servable, self.answers, self.counters = settings, servable, answers, counters
        self.metrics: WorkerMetrics = metrics if metrics is not None else NullMetrics()
        self.reply_prefix = ModelKeys(settings.namespace, settings.model, settings.group).reply("")

    def reply_allowed(self, reply_to: str) -> bool:
        """A result may only go to a reply stream of this model (``<ns>:{<model>}:reply:*``):
        otherwise a producer could make workers write into any key they can write (another
        model's request stream, the DLQ), and on Redis Cluster a foreign slot would break the
        atomic commit script."""
        return not self.settings.restrict_reply_to or reply_to.startswith(self.reply_prefix)

    def undecodable(self, entry: Entry, err: E.HeadraceError, unit: Unit) -> None:
        """Answer an entry whose envelope did not decode, or dead-letter it when it has no
        usable id/reply_to (nobody can be told)."""
        route = route_of(entry.fields)
        if route is None or not self.reply_allowed(route[1]):
            self.answers.dead_letter(entry, None, err.code, f"unroutable entry: {err.message}", unit)
        else:
            self.answers.error(Envelope(request_id=route[0], reply_to=route[1]), entry, err.code, err.message, unit)

    def admit(self, entry: Entry, env: Envelope, answered: bool, at_ms: int, unit: Unit,
              cancelled_ms: int = 0) -> Work | None:
        """The entry as runnable :class:`Work`, or None when it was answered (or skipped)
        here. ``cancelled_ms``: its cancel marker (Unix ms, 0 = none)."""
        try:
            if cancelled_ms and env.ts_ms <= cancelled_ms and self.reply_allowed(env.reply_to) and not answered:
                self.skip_cancelled(entry, env, at_ms, unit)
                return None
            return self._admit(entry, env, answered, at_ms, unit)
        except Exception as err:  # noqa: BLE001 - a request must never kill the loop
            log.exception("admitting request %s failed unexpectedly", env.request_id)
            self.answers.error(env, entry, E.INTERNAL_ERROR, f"worker could not admit the request: {err}", unit)
            return None

    def _admit(self, entry: Entry, env: Envelope, answered: bool, at: int, unit: Unit) -> Work | None:
        s, ans = self.settings, self.answers
        if not self.reply_allowed(env.reply_to):
            ans.dead_letter(entry, None, E.DECODE_ERROR,
                            f"reply_to {env.reply_to[:80]!r} is not a reply stream of this model "
                            f"({self.reply_prefix}<client>); nobody was answered", unit)
            return None
        if answered:
            self.counters["duplicates"] += 1
            log.debug("request %s (entry %s) was answered before; acking", env.request_id, entry.entry_id)
            unit.add(Ack(entry.entry_id), None)
            return None
        if entry.deliveries > s.max_deliveries:
            ans.dead_letter(entry, env, E.MAX_DELIVERIES,
                            f"delivered {entry.deliveries} times (max_deliveries={s.max_deliveries}); "
                            "workers kept failing or dying on it", unit)
            return None
        if env.model and env.model != s.model:
            ans.error(env, entry, E.UNKNOWN_MODEL, f"request names model {env.model!r} but was queued for "
                      f"{s.model!r}", unit)
            return None
        if env.expired(at):
            ans.error(env, entry, E.DEADLINE_EXCEEDED, f"deadline passed {at - env.deadline_ms} ms before it was "
                      "read", unit, status=STATUS_EXPIRED)
            return None
        try:
            req = decode_body(env, entry.fields.get(b"body"), s.limits)
            if s.reject_non_finite:
                check_finite(req)
            self.servable.check(req)
        except E.HeadraceError as err:
            ans.error(env, entry, err.code, err.message, unit)
            return None
        except Exception as err:  # noqa: BLE001 - a servable's check failing oddly is its bug, not the loop's
            log.exception("servable check raised for request %s", env.request_id)
            ans.error(env, entry, E.MODEL_ERROR, f"input check failed: {type(err).__name__}: {err}", unit)
            return None
        return Work(entry, req, at, self.length(req))

    def skip_cancelled(self, entry: Entry, env: Envelope, at_ms: int, unit: Unit) -> None:
        """Its producer cancelled it (a cancel marker at or after its ``ts_ms``): ack it
        without running or answering it; nobody waits for the answer."""
        self.counters["cancelled"] += 1
        queue_s = max(0.0, (at_ms - env.ts_ms) / 1000.0) if env.ts_ms else 0.0
        self.metrics.observe_request(CANCELLED, CANCELLED, queue_s, 0.0)
        log.debug("request %s (entry %s) was cancelled by its producer; skipped", env.request_id, entry.entry_id)
        unit.add(Ack(entry.entry_id), None)

    def length(self, request: Request) -> int:
        """The servable's batching cost hint; 0 when it fails."""
        try:
            return int(self.servable.length(request))
        except Exception:  # noqa: BLE001 - length is only a batching hint
            return 0
