"""The ops that answer requests: results, error results, dead letters."""

from __future__ import annotations

import logging

from headrace.client import errors as E
from headrace.client.protocol import (
    STATUS_ERROR,
    STATUS_OK,
    Envelope,
    Result,
    Status,
    Timings,
    encode_result,
    error_result,
    now_ms,
)
from headrace.client.results import encode_stacked_result
from headrace.workers.pipeline.entry import Entry, elapsed_ms
from headrace.workers.pipeline.group import Group
from headrace.workers.pipeline.ops import Ack, DeadLetterOp, Reply
from headrace.workers.pipeline.work import Meta, Unit

log = logging.getLogger(__name__)


class Answers:
    """Builds the ops that answer requests, stamped with model, version and worker name."""

    def __init__(self, model: str, version: str, consumer: str) -> None:
        self.model, self.version, self.consumer = model, version, consumer

    def ack(self, entry: Entry, unit: Unit) -> None:
        """Queue acknowledging ``entry`` without an answer (its request was answered)."""
        unit.add(Ack(entry.entry_id), None)

    def reply(self, env: Envelope, entry: Entry, res: Result, unit: Unit, queue_s: float = 0.0) -> None:
        """Queue ``res`` for the producer.

        Raises:
            InvalidTensorError: an output has a dtype that is not a wire dtype.
        """
        self._queue(env, entry, encode_result(res), res.status, res.code, queue_s, unit)

    @staticmethod
    def _queue(env: Envelope, entry: Entry, fields: dict[bytes, bytes], status: str, code: str, queue_s: float,
               unit: Unit) -> None:
        unit.add(Reply(entry.entry_id, env.request_id, env.reply_to, fields), Meta(status, code, env.ts_ms, queue_s))

    def reply_group(self, group: Group, unit: Unit) -> None:
        """Queue the one result of a multi-sample entry whose slots are all filled (from the
        stacked outputs of its blocks when they answered every sample)."""
        if group.answered:
            return
        group.answered = True
        env = group.envelope
        queue_ms = elapsed_ms(group.read_ms, env.ts_ms)
        timings = Timings(queue_ms, group.infer_s * 1000, group.batch_size, self.consumer)
        stacked = group.stacked()
        if stacked is not None:
            fields = encode_stacked_result(env.request_id, stacked, timings, self.model, self.version)
            self._queue(env, group.entry, fields, STATUS_OK, "", queue_ms / 1000, unit)
            return
        res = Result(env.request_id, STATUS_OK, model=self.model, version=self.version, samples=group.results(),
                     timings=timings)
        self.reply(env, group.entry, res, unit, queue_ms / 1000)

    def error(self, env: Envelope, entry: Entry, code: str, message: str, unit: Unit,
              status: Status = STATUS_ERROR, read_ms: int = 0) -> None:
        """Queue an error result; its ``queue_ms`` runs from the producer's ``ts_ms`` to
        ``read_ms`` (default: now): a refused request waited too."""
        log.debug("request %s answered %s/%s: %s", env.request_id, status, code, message)
        queue_ms = elapsed_ms(read_ms or now_ms(), env.ts_ms)
        res = error_result(env.request_id, code, message, status=status, model=self.model,
                           version=self.version, timings=Timings(queue_ms=queue_ms, worker=self.consumer))
        self.reply(env, entry, res, unit, queue_ms / 1000.0)

    def dead_letter(self, entry: Entry, env: Envelope | None, code: str, reason: str, unit: Unit,
                    reply_code: str = E.MAX_DELIVERIES) -> None:
        """Queue moving ``entry`` to the DLQ; the producer (when known) gets ``reply_code``."""
        reply = None
        if env is not None:
            reply = encode_result(error_result(env.request_id, reply_code, reason, model=self.model,
                                               version=self.version, timings=Timings(worker=self.consumer)))
        op = DeadLetterOp(entry.entry_id, entry.fields, reason, code, entry.deliveries,
                          env.request_id if env else None, env.reply_to if env else None, reply,
                          entry_bytes=entry.size_bytes, entry_fields=entry.field_count)
        unit.add(op, Meta(STATUS_ERROR, reply_code if env else code, env.ts_ms if env else 0, 0.0))
        log.warning("dead-lettering entry %s (request %s) after %d deliveries: %s", entry.entry_id,
                    env.request_id if env else "?", entry.deliveries, reason)
