"""The intake tasks of a worker: reading new entries, claiming abandoned ones, admitting them.

* reader: reads new entries when the batcher has room and the entries held stay within
  ``memory_budget_bytes`` (each read is sized to what is left), then admits them. The reader
  prefetches at most one batch ahead, so the next batch is read and checked while the
  current one runs.
* claimer: every ``lease_s / 2`` takes over entries abandoned by dead consumers; entries
  delivered more than ``max_deliveries`` times are dead-lettered at admission.
* admission (:mod:`~headrace.workers.engine.admission`): cheap steps on the event loop; the
  body decoding and input checks of texts (tokenising) and of large bodies on the admission
  thread, so a costly request never stalls the loop (small tensor bodies are checked on the
  loop: cheaper than the hop to the thread).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from headrace.client import errors as E
from headrace.client.protocol import Envelope, now_ms
from headrace.workers.engine.admission import Admission, Admitted, Refusal, Samples
from headrace.workers.engine.daemon import DaemonExecutor
from headrace.workers.engine.state import Shared
from headrace.workers.pipeline.entry import Entry
from headrace.workers.pipeline.work import Unit, Work

log = logging.getLogger(__name__)

#: bodies up to this many bytes in all (per read) are checked on the event loop: less work
#: than the hop to the admission thread. Larger ones, and every text (tokenising), go there.
INLINE_BODY_BYTES = 64 * 1024


class Intake:
    """The reader and claimer of one worker (see module doc)."""

    def __init__(self, shared: Shared, admission: Admission) -> None:
        self.shared = shared
        self.admission = admission
        self.thread = DaemonExecutor(f"headrace-admit-{shared.settings.model}")

    def _stopping(self) -> bool:
        return self.shared.control.stopping

    async def _wait_for_room(self) -> None:
        s = self.shared
        await s.batcher.wait_for_room(s.settings.max_batch, until=self._stopping)
        await s.in_flight.wait_below(s.settings.memory_budget_bytes, until=self._stopping)

    async def read_loop(self) -> None:
        s = self.shared
        backoff = s.control.backoff("XREADGROUP")
        while not s.control.stopping:
            try:
                await self._wait_for_room()
                if s.control.stopping:
                    break
                # Room is counted in samples; multi-sample entries fill it faster.
                room = max(1, int((s.settings.max_batch - len(s.batcher)) / s.samples_per_entry))
                entries = await s.broker.read(room, s.settings.block_ms, max(1, s.budget_left()))
                backoff.ok()
                if entries:
                    await self.admit(entries)
                    # A batch just made ready starts (its model call goes to the inference
                    # thread) before this loop spends its Python on sending the next read: on
                    # an idle worker that read would otherwise sit in front of every request.
                    await s.batcher.handed_over()
            except E.BrokerError as e:
                await backoff.wait(e)

    async def claim_loop(self) -> None:
        s = self.shared
        backoff = s.control.backoff("XAUTOCLAIM")
        while not s.control.stopping:
            try:
                await self._wait_for_room()
                lease_ms = int(s.settings.lease_s * 1000)
                entries = await s.broker.claim_abandoned(lease_ms, s.settings.max_batch, max(1, s.budget_left()))
                backoff.ok()
            except E.BrokerError as e:
                await backoff.wait(e)
                continue
            if entries:
                s.counters["claimed"] += len(entries)
                log.info("claimed %d abandoned entries (e.g. %s, %d deliveries)", len(entries),
                         entries[0].entry_id, entries[0].deliveries)
                await self.admit(entries)
            if len(entries) < s.settings.max_batch:
                # Else a dead worker left more behind: the next batch as soon as there is room.
                await s.control.sleep(s.settings.lease_s / 2)

    async def admit(self, entries: Sequence[Entry]) -> None:
        """Admit ``entries`` (see :mod:`~headrace.workers.engine.admission`): answer what
        cannot run, queue the rest for batching. An entry nothing could answer is let go
        (redelivered after the lease, dead-lettered after ``max_deliveries``)."""
        s = self.shared
        unit = Unit()
        at = now_ms()
        routed: list[tuple[Entry, Envelope]] = []
        for entry in entries:
            if not s.in_flight.add(entry):
                continue  # our own entry, claimed back after a late lease refresh: on its way already
            s.counters["read"] += 1
            n = len(unit.ops)
            self._keep(entry, self.admission.route(entry, unit), unit, n, routed)
        answered, cancelled = await self._prechecks([env.request_id for _, env in routed])
        candidates: list[tuple[Entry, Envelope]] = []
        for (entry, env), done, cancel_ms in zip(routed, answered, cancelled, strict=True):
            n = len(unit.ops)
            kept = self.admission.screen(entry, env, done, at, unit, cancelled_ms=cancel_ms)
            self._keep(entry, env if kept else None, unit, n, candidates)
        if candidates:
            results = await self._prepare(candidates, at)
            samples = sum(len(res.group.slots) if isinstance(res, Samples) else 1 for res in results)
            s.samples_per_entry = 0.8 * s.samples_per_entry + 0.2 * samples / len(results)
            for (entry, env), res in zip(candidates, results, strict=True):
                if isinstance(res, Work):
                    s.batcher.put(res, res.length)
                elif isinstance(res, Samples):
                    for w in res.works:
                        s.batcher.put(w, w.length, w.count)
                    if res.group.complete:  # every sample refused at admission
                        s.answers.reply_group(res.group, unit)
                else:
                    s.answers.error(env, entry, res.code, res.message, unit, read_ms=at)
        s.emit(unit)

    def _keep(self, entry: Entry, env: Envelope | None, unit: Unit, ops_before: int,
              out: list[tuple[Entry, Envelope]]) -> None:
        """Pass the entry on to the next step, or let it go when the step answered nothing."""
        if env is not None:
            out.append((entry, env))
        elif len(unit.ops) == ops_before:
            self.shared.in_flight.pop(entry.entry_id)

    async def _prechecks(self, request_ids: list[str]) -> tuple[list[bool], list[int]]:
        """Dedupe markers and cancel markers of ``request_ids`` (one round trip where the
        broker can)."""
        if not request_ids:
            return [], []
        try:
            return await self.shared.broker.prechecks(request_ids)
        except E.BrokerError as err:
            # The commit script dedupes anyway; the pre-check only saves running them, and
            # a missed cancel only means running a request for nobody.
            log.debug("dedupe/cancel pre-check skipped: %s", err)
            return [False] * len(request_ids), [0] * len(request_ids)

    async def _prepare(self, items: list[tuple[Entry, Envelope]], at: int) -> list[Admitted]:
        body_bytes = sum(len(entry.fields.get(b"body") or b"") for entry, _ in items)
        if not self.shared.servable.accepts_text and body_bytes <= INLINE_BODY_BYTES:
            return self.admission.prepare_all(items, at)
        try:
            return await self.thread.run(self.admission.prepare_all, items, at)
        except Exception as err:  # noqa: BLE001 - prepare never raises; a failure here is the thread's
            log.exception("admission thread failed")
            return [Refusal(E.INTERNAL_ERROR, f"worker could not check the request: {type(err).__name__}: {err}")
                    for _ in items]

    def close(self) -> None:
        self.thread.shutdown()
