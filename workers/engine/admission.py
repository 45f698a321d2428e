"""Admission of request entries: per entry, run it or answer it at once.

Three stages, each of which can fail for one entry alone (an unexpected exception answers
that entry ``internal_error``, or dead-letters it when nobody can be told):

* :meth:`Admission.route` (event loop, cheap): oversize entries are dead-lettered by their
  sizes; the envelope is decoded (an undecodable one is answered, or dead-lettered when it
  has no usable id/``reply_to``); ``reply_to`` must be one of this model's reply streams.
* :meth:`Admission.screen` (event loop, cheap): already answered (ack only), cancelled by its
  producer (ack only, unanswered), delivered too often (DLQ), another model, past its deadline.
* :meth:`Admission.prepare` (admission thread, may be costly: body decoding, the servable's
  input check, its length hint, e.g. tokenising a text): the request as :class:`Work`, or the
  :class:`Refusal` to answer it with.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from headrace.client import errors as E
from headrace.client.keys import ModelKeys, partition_keys
from headrace.client.protocol import STATUS_EXPIRED, Envelope, Request, decode_body_map, unpack_body
from headrace.client.samples import (
    all_valid_texts,
    declared_count,
    decode_sample_arrays,
    decode_samples,
    decode_texts,
    is_multi,
    slots_of,
)
from headrace.workers.backends.base import Servable, runs_stacked
from headrace.workers.backends.validate import check_finite
from headrace.workers.metrics import CANCELLED, NullMetrics, WorkerMetrics
from headrace.workers.pipeline.answers import Answers
from headrace.workers.pipeline.entry import Entry, elapsed_ms, envelope_of, route_of
from headrace.workers.pipeline.group import Group
from headrace.workers.pipeline.work import Unit, Work
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """Why a request is answered without running: its wire ``code`` and a message."""

    code: str
    message: str


@dataclass(frozen=True)
class Samples:
    """A multi-sample entry admitted: its group and the samples that go on to a model call
    (those refused at admission have their slot filled already)."""

    group: Group
    works: list[Work]


Admitted = Work | Samples | Refusal


class Admission:
    """Per-entry admission decisions (see module doc)."""

    def __init__(self, settings: WorkerSettings, servable: Servable, answers: Answers,
                 counters: Counter[str], metrics: WorkerMetrics | None = None) -> None:
        self.settings, self.servable, self.answers, self.counters = settings, servable, answers, counters
        self.stacked = runs_stacked(servable)
        self.metrics: WorkerMetrics = metrics if metrics is not None else NullMetrics()
        self.reply_prefix = ModelKeys(settings.namespace, settings.model, settings.group).reply("")
        # A partitioned model's reply streams live in its partitions' slots.
        self.reply_prefixes = tuple(k.reply("") for k in partition_keys(
            settings.namespace, settings.model, settings.partitions, settings.group))

    def reply_allowed(self, reply_to: str) -> bool:
        """A result may only go to a reply stream of this model (``<ns>:{<model>}:reply:*``):
        otherwise a producer could make workers write into any key they can write (another
        model's request stream, the DLQ), and on Redis Cluster a foreign slot would break the
        atomic commit script."""
        return not self.settings.restrict_reply_to or reply_to.startswith(self.reply_prefixes)

    # --- stage 1: route ----------------------------------------------------------------------

    def route(self, entry: Entry, unit: Unit) -> Envelope | None:
        """The entry's envelope when it can go on, else None (answered or dead-lettered)."""
        try:
            return self._route(entry, unit)
        except Exception as err:  # noqa: BLE001 - one entry's failure is that entry's answer
            log.exception("routing entry %s failed unexpectedly", entry.entry_id)
            self.unexpected(entry, None, err, unit)
            return None

    def _route(self, entry: Entry, unit: Unit) -> Envelope | None:
        if entry.truncated:
            self._oversize(entry, unit)
            return None
        try:
            env = envelope_of(entry)
        except E.HeadraceError as err:
            self._undecodable(entry, err, unit)
            return None
        if not self.reply_allowed(env.reply_to):
            self.answers.dead_letter(entry, None, E.DECODE_ERROR,
                                     f"reply_to {env.reply_to[:80]!r} is not a reply stream of this model "
                                     f"({self.reply_prefix}<client>); nobody was answered", unit)
            return None
        return env

    def _oversize(self, entry: Entry, unit: Unit) -> None:
        reason = (f"entry of {entry.size_bytes} bytes in {entry.field_count} fields exceeds the "
                  f"{self.settings.max_entry_bytes} bytes a worker reads (max_payload_bytes + 64 KiB, all fields "
                  "counted); its payload was not read")
        route = route_of(entry.fields)
        env = Envelope(request_id=route[0], reply_to=route[1]) if route and self.reply_allowed(route[1]) else None
        self.answers.dead_letter(entry, env, E.PAYLOAD_TOO_LARGE, reason, unit, reply_code=E.PAYLOAD_TOO_LARGE)

    def _undecodable(self, entry: Entry, err: E.HeadraceError, unit: Unit) -> None:
        """Answer an entry whose envelope did not decode, or dead-letter it when it has no
        usable id/reply_to (nobody can be told)."""
        route = route_of(entry.fields)
        if route is None or not self.reply_allowed(route[1]):
            self.answers.dead_letter(entry, None, err.code, f"unroutable entry: {err.message}", unit)
        else:
            self.answers.error(Envelope(request_id=route[0], reply_to=route[1]), entry, err.code, err.message, unit)

    # --- stage 2: screen ---------------------------------------------------------------------

    def screen(self, entry: Entry, env: Envelope, answered: bool, at_ms: int, unit: Unit,
               cancelled_ms: int = 0) -> bool:
        """True when the request goes on to :meth:`prepare`; else it was answered (or
        skipped) here. ``cancelled_ms``: its cancel marker (Unix ms, 0 = none)."""
        try:
            if cancelled_ms and not answered and env.ts_ms <= cancelled_ms:
                self.skip_cancelled(entry, env, at_ms, unit)
                return False
            return self._screen(entry, env, answered, at_ms, unit)
        except Exception as err:  # noqa: BLE001 - one entry's failure is that entry's answer
            log.exception("screening request %s failed unexpectedly", env.request_id)
            self.unexpected(entry, env, err, unit)
            return False

    def _screen(self, entry: Entry, env: Envelope, answered: bool, at: int, unit: Unit) -> bool:
        s, ans = self.settings, self.answers
        if answered:
            self.counters["duplicates"] += 1
            log.debug("request %s (entry %s) was answered before; acking", env.request_id, entry.entry_id)
            ans.ack(entry, unit)
            return False
        if entry.deliveries > s.max_deliveries:
            ans.dead_letter(entry, env, E.MAX_DELIVERIES,
                            f"delivered {entry.deliveries} times (max_deliveries={s.max_deliveries}); "
                            "workers kept failing or dying on it", unit)
            return False
        if env.model and env.model != s.model:
            ans.error(env, entry, E.UNKNOWN_MODEL, f"request names model {env.model!r} but was queued for "
                      f"{s.model!r}", unit, read_ms=at)
            return False
        if env.expired(at):
            ans.error(env, entry, E.DEADLINE_EXCEEDED, f"deadline passed {at - env.deadline_ms} ms before it was "
                      "read", unit, status=STATUS_EXPIRED, read_ms=at)
            return False
        return True

    def skip_cancelled(self, entry: Entry, env: Envelope, at_ms: int, unit: Unit) -> None:
        """Its producer cancelled it (a cancel marker at or after its ``ts_ms``): ack it
        without running or answering it; nobody waits for the answer."""
        self.counters["cancelled"] += 1
        self.metrics.observe_request(CANCELLED, CANCELLED, elapsed_ms(at_ms, env.ts_ms) / 1000.0, 0.0)
        log.debug("request %s (entry %s) was cancelled by its producer; skipped", env.request_id, entry.entry_id)
        self.answers.ack(entry, unit)

    # --- stage 3: prepare (admission thread) ---------------------------------------------------

    def prepare_all(self, items: Sequence[tuple[Entry, Envelope]], at_ms: int) -> list[Admitted]:
        """:meth:`prepare` for each item (one call into the admission thread), then the
        servable's length hints of every request that goes on, in one call (a text model
        tokenises them with one ``encode_batch``)."""
        out = [self.prepare(entry, env, at_ms) for entry, env in items]
        works = [w for res in out for w in ((res,) if isinstance(res, Work) else
                                            res.works if isinstance(res, Samples) else ())]
        if not works or not self.servable.accepts_text:
            return out  # tensor requests got their (cheap) hint in prepare
        sized = {id(w): new for w, new in zip(works, self._sized_texts(works), strict=True)}
        return [sized[id(res)] if isinstance(res, Work)
                else Samples(res.group, [sized[id(w)] for w in res.works]) if isinstance(res, Samples) else res
                for res in out]

    def _sized_texts(self, works: list[Work]) -> list[Work]:
        """``works`` (texts) with their length hints, from one call into the servable (one
        ``encode_batch`` of every text of the read); a text block gets one per row."""
        if not self.stacked:
            return [dataclasses.replace(w, length=n) for w, n in zip(works, self.lengths([w.request for w in works]),
                                                                       strict=True)]
        texts: list[str] = []
        for w in works:
            texts.extend(w.texts if w.block else (w.request.text or "",))
        try:
            hints = [int(n) for n in self.servable.text_lengths(texts)]
        except Exception:  # noqa: BLE001 - length is only a batching hint
            hints = []
        if len(hints) != len(texts):
            hints = [0] * len(texts)
        out: list[Work] = []
        at = 0
        for w in works:
            if w.block:
                rows = hints[at:at + w.count]
                out.append(dataclasses.replace(w, length=max(rows), row_lengths=rows))
                at += w.count
            else:
                out.append(dataclasses.replace(w, length=hints[at]))
                at += 1
        return out

    def prepare(self, entry: Entry, env: Envelope, at_ms: int) -> Admitted:
        """Decode and check the body; never raises."""
        try:
            body = unpack_body(entry.fields.get(b"body"), self.settings.limits)
            declared = declared_count(entry.fields)
            if is_multi(body):
                return self._prepare_samples(entry, env, body, declared, at_ms)
            if declared not in (None, 1):
                raise E.ProtocolError(f"entry field n={declared} but the body carries one sample", code=E.BAD_VALUE)
            req = decode_body_map(env, body, self.settings.limits)
            self._check(req)
        except E.HeadraceError as err:
            return Refusal(err.code, err.message)
        except Exception as err:  # noqa: BLE001 - a servable's check failing oddly is its bug
            log.exception("input check raised for request %s", env.request_id)
            return Refusal(E.MODEL_ERROR, f"input check failed: {type(err).__name__}: {err}")
        return Work(entry, req, at_ms, 0 if self.servable.accepts_text else self.lengths([req])[0])

    def _check(self, req: Request) -> None:
        if self.settings.reject_non_finite:
            check_finite(req)
        self.servable.check(req)

    def _prepare_samples(self, entry: Entry, env: Envelope, body: dict[str, object], declared: int | None,
                         at_ms: int) -> Samples:
        """Split a multi-sample body: a sample failing its checks fills its slot with the
        error, the others go on. Entry-wide faults (count, tensors) raise (see
        :func:`~headrace.client.samples.decode_samples`). A tensor entry for a servable that
        runs stacked samples goes on as one block when its samples pass the checks (they
        share their shapes and dtypes: the first one is checked for all)."""
        s = self.settings
        if "texts" in body:
            if self.stacked:
                block = self._text_block(entry, env, decode_texts(body, declared, s.max_samples_per_entry), at_ms)
                if block is not None:
                    return block
            slots = decode_samples(env, body, declared, s.max_samples_per_entry, s.limits)
        elif not self.stacked:
            slots = decode_samples(env, body, declared, s.max_samples_per_entry, s.limits)
        else:
            arrays, finite = decode_sample_arrays(body, declared, s.max_samples_per_entry, s.limits)
            block = self._block(entry, env, arrays, finite, at_ms)
            if block is not None:
                return block
            slots = slots_of(env, arrays, finite)
        group = Group(entry, env, at_ms, len(slots))
        works: list[Work] = []
        hint: int | None = None  # the samples of one tensor entry share their shapes: one hint
        for i, slot in enumerate(slots):
            if slot.request is None:
                group.fail(i, slot.code, slot.message)
                continue
            if not slot.finite and self.settings.reject_non_finite:
                group.fail(i, E.BAD_VALUE, f"sample {i}: a float input holds NaN or Inf; send finite values")
                continue
            try:
                self.servable.check(slot.request)
            except E.HeadraceError as err:
                group.fail(i, err.code, f"sample {i}: {err.message}")
                continue
            except Exception as err:  # noqa: BLE001 - a servable's check failing oddly is its bug
                group.fail(i, E.MODEL_ERROR, f"sample {i}: input check failed: {type(err).__name__}: {err}")
                continue
            if hint is None:
                hint = 0 if self.servable.accepts_text else self.lengths([slot.request])[0]
            works.append(Work(entry, slot.request, at_ms, hint, group, i))
        return Samples(group, works)

    def _block(self, entry: Entry, env: Envelope, arrays: dict[str, Any], finite: Any, at_ms: int) -> Samples | None:
        """The entry as one block of stacked samples, or None when some sample may fail its
        checks (``finite``, one bool per sample, is not all true; the first sample refused):
        then each goes alone, and the failing ones are refused in their slots."""
        if not finite.all():
            return None
        first = Request(env, inputs={k: a[0] for k, a in arrays.items()})
        try:
            self.servable.check(first)
        except Exception:  # noqa: BLE001 - the per-sample path reports it, slot by slot
            return None
        group = Group(entry, env, at_ms, len(finite))
        work = Work(entry, Request(env, inputs=arrays), at_ms, self.lengths([first])[0], group, 0, len(finite),
                    block=True)
        return Samples(group, [work])

    def _text_block(self, entry: Entry, env: Envelope, texts: list[Any], at_ms: int) -> Samples | None:
        """The texts of an entry as one block, or None when some text may be refused (not a
        str, too long, or the first one fails the servable's check): then each goes alone.
        Its length hints are set by :meth:`prepare_all` (one tokenisation per read)."""
        if not all_valid_texts(texts, self.settings.limits):
            return None
        try:
            self.servable.check(Request(env, text=texts[0]))
        except Exception:  # noqa: BLE001 - the per-sample path reports it, slot by slot
            return None
        group = Group(entry, env, at_ms, len(texts))
        return Samples(group, [Work(entry, Request(env), at_ms, 0, group, 0, len(texts), block=True, texts=texts)])

    def lengths(self, requests: Sequence[Request]) -> list[int]:
        """The servable's batching cost hints; zeros when they fail."""
        try:
            hints = [int(n) for n in self.servable.lengths(requests)]
        except Exception:  # noqa: BLE001 - length is only a batching hint
            return [0] * len(requests)
        return hints if len(hints) == len(requests) else [0] * len(requests)

    # --- failures ------------------------------------------------------------------------------

    def unexpected(self, entry: Entry, env: Envelope | None, err: BaseException, unit: Unit) -> None:
        """Answer ``entry`` for a failure of the worker's own code: ``internal_error`` to its
        producer when it can be told, else the DLQ. Never raises."""
        message = f"worker could not handle the request: {type(err).__name__}: {err}"[:500]
        try:
            route = (env.request_id, env.reply_to) if env is not None else route_of(entry.fields)
            if route is not None and self.reply_allowed(route[1]):
                self.answers.error(Envelope(request_id=route[0], reply_to=route[1]), entry, E.INTERNAL_ERROR,
                                   message, unit)
            else:
                self.answers.dead_letter(entry, None, E.INTERNAL_ERROR, message, unit)
        except Exception:  # noqa: BLE001 - last resort: the entry stays pending, redelivered
            log.exception("could not answer entry %s", entry.entry_id)
