"""The protocol's loops, written once for both clients as generators of effects
(:mod:`headrace.client.effects`): submit with its checks and retries, ``infer``, ``collect``,
``results``, ``imap``, model status and the reply reader. A shell runs a flow by performing
each effect it yields (see :class:`~headrace.client.Client` and
:class:`~headrace.client.AsyncClient`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis

from headrace.client import errors as E
from headrace.client import health
from headrace.client.arrays import ArrayResults, Plan, array_entries
from headrace.client.backoff import BackoffPolicy
from headrace.client.bulk import MapWindow, Source, Step
from headrace.client.chunks import Chunk, chunked, expand
from headrace.client.core import READ_COUNT, ClientCore
from headrace.client.effects import (
    Delete,
    Emit,
    Flow,
    ReaderId,
    ReadModel,
    Resolve,
    Send,
    Sleep,
    Wait,
    WaitAll,
    WaitAny,
    WakeReader,
    XRead,
)
from headrace.client.failures import permission_denied, unreachable
from headrace.client.forks import check_owners
from headrace.client.progress import Progress
from headrace.client.protocol import Result
from headrace.client.retry import Attempts, Retry
from headrace.client.submit import wait_seconds
from headrace.client.tickets import Ticket, ordered_results

log = logging.getLogger(__name__)


def gate(core: ClientCore, model: str) -> Flow[None]:
    """The submit checks (``require_registered``, ``fail_fast``) on a cached registry read.

    Raises:
        UnknownModel, ModelUnavailable: see :class:`ClientSettings`. BrokerError: the read failed.
    """
    s = core.settings
    if core.checked(model):
        return
    if not core.registry.fresh(model):
        try:
            record, now_ms = yield ReadModel(model, cached_ok=True)
        except E.BrokerError as e:
            if not permission_denied(e):
                if unreachable(e) and core.registry.known(model):
                    # On a Redis Cluster the registry key lives on one master, the model's
                    # streams on others: that master down must not stop submits to the
                    # others. A model this client saw registered is sent on that read; the
                    # submit itself fails if its own master is down too.
                    core.registry.warn_stale(model, e)
                    return
                raise
            # The Redis user may not read the registry (an ACL without HGET on <ns>:models):
            # the checks cannot be made, which must not stop the submits.
            if not core.registry.unreadable:
                log.warning("cannot read the model registry to check model %r (%s); submitting without the "
                            "require_registered/fail_fast checks", model, e)
            core.registry.unreadable = True
            return
        core.registry.store(model, record, now_ms)
    core.registry.check(model, require_registered=s.require_registered, fail_fast=s.fail_fast,
                        namespace=s.namespace, partitions=s.partitions)


def send(core: ClientCore, tickets: Sequence[Ticket], *, resubmit: bool = False) -> Flow[list[E.HeadraceError | None]]:
    """Submit ``tickets`` in one pipeline; per ticket the error that refused it, None when
    enqueued (see :meth:`ClientCore.settle_all`)."""
    if not tickets:
        return []
    new_stream, commands = core.register(tickets)
    if new_stream:
        yield WakeReader()
    replies = yield Send(commands)
    return core.settle_all(tickets, replies, resubmit=resubmit)


def submit(core: ClientCore, ticket: Ticket, attempts: Attempts, *, check: bool = True,
           resubmit: bool = False) -> Flow[None]:
    """Enqueue ``ticket``, trying again as ``attempts`` allows.

    Raises:
        UnknownModel, ModelUnavailable (with ``check``), QueueFull, BrokerError.
    """
    if check and not core.checked(ticket.model):  # the common case decides without a generator
        yield from gate(core, ticket.model)
    while True:
        err = (yield from send(core, [ticket], resubmit=resubmit))[0]
        if err is None:
            return
        delay = attempts.next_delay(err)
        if delay is None:
            raise err
        log.info("retrying request %s in %.2fs after: %s", ticket.request_id, delay, err)
        yield Sleep(delay)


def infer(core: ClientCore, ticket: Ticket, timeout_s: float | None, retry: Retry | None) -> Flow[Result]:
    """Submit ``ticket`` and wait for its result; with a retry policy, submit it again
    (same id) when an attempt's wait runs out. Whatever ends the call without a result
    (timeout, error, cancellation of the caller) cancels the request: its marker tells
    workers to skip it, and the client stops tracking it.

    Raises:
        UnknownModel, ModelUnavailable, QueueFull, BrokerError, ResultTimeout, RequestCancelled.
    """
    policy = core.policy(retry)
    attempts = policy.start(ticket.deadline_ms)
    wait_s = wait_seconds(timeout_s, core.settings.timeout_s)
    try:
        yield from submit(core, ticket, attempts)
        while not (yield Wait(ticket, wait_s)):
            err = core.timeout_error(ticket, wait_s, timeout_s)
            delay = attempts.next_delay(err)
            if delay is None:
                raise err
            log.info("no result for request %s within %.3fs; submitting it again in %.2fs", ticket.request_id,
                     wait_s, delay)
            yield Sleep(delay)
            if not ticket.done():
                yield from submit(core, ticket, attempts, check=False, resubmit=True)
        return ticket.result(0)
    finally:
        if not ticket.done():
            ticket.cancel()


def collect(core: ClientCore, tickets: Sequence[Ticket], timeout_s: float | None) -> Flow[list[Result]]:
    """Results of all ``tickets`` in order, waiting up to ``timeout_s`` for all together.

    Raises:
        ResultTimeout: not all arrived (the tickets stay collectable). RequestCancelled.
    """
    wait_s = wait_seconds(timeout_s, core.settings.timeout_s)
    check_owners(tickets)
    missing = yield WaitAll(tickets, wait_s)
    if missing:
        raise E.ResultTimeout(f"{missing} of {len(tickets)} results did not arrive within {wait_s:.3f}s; "
                              "the tickets stay collectable", timeout_s=wait_s)
    return ordered_results(tickets)


def results(core: ClientCore, tickets: Iterable[Ticket], timeout_s: float | None) -> Flow[None]:
    """Emit results as they arrive (completion order), within ``timeout_s`` in total.

    Raises:
        ResultTimeout: the rest did not arrive in time. RequestCancelled: one was cancelled.
    """
    import time

    wait_s = wait_seconds(timeout_s, core.settings.timeout_s)
    pending = list(tickets)
    check_owners(pending)
    give_up = time.monotonic() + wait_s
    while pending:
        done = yield WaitAny(pending, max(0.0, give_up - time.monotonic()))
        if not done:
            raise E.ResultTimeout(f"{len(pending)} results did not arrive within {wait_s:.3f}s", timeout_s=wait_s)
        ids = {id(t) for t in done}
        pending = [t for t in pending if id(t) not in ids]
        yield Emit([t.result(0) for t in done])


def imap(core: ClientCore, model: str, items: Iterable[Any], *, timeout_s: float | None, deadline_s: float | None,
         retry: Retry | None, progress: Progress, raise_on_error: bool, chunk_size: int | None = None) -> Flow[None]:
    """Emit a result per item, in input order (see ``Client.map``). Items go out in chunks of
    ``chunk_size`` (None: the client's setting) as multi-sample entries. Requests still out
    when the map ends early (an error, or the caller stops iterating) are cancelled.

    Raises:
        UnknownModel, ModelUnavailable, ProtocolError, QueueFull, BrokerError, ResultTimeout,
        InferenceFailed, RequestExpired.
    """
    size = _chunk_size(core, chunk_size)

    def take(popped: list[tuple[Ticket, int]]) -> list[Result]:
        burst = [res for ticket, n in popped for res in expand(ticket.result(0), n)]
        if raise_on_error:
            for res in burst:
                res.raise_for_status()
        return burst

    yield from _run_window(core, model, chunked(items, size), take, timeout_s=timeout_s, deadline_s=deadline_s,
                           retry=retry, progress=progress)


def imap_arrays(core: ClientCore, model: str, blocks: Iterable[Any], *, timeout_s: float | None,
                deadline_s: float | None, retry: Retry | None, progress: Progress, raise_on_error: bool,
                chunk_size: int | None = None) -> Flow[None]:
    """Emit one :class:`ArrayResults` per block, in input order (see ``Client.map_arrays``):
    each block goes out as multi-sample entries of ``chunk_size`` samples (None: the
    client's setting), through the same window, retries and cancellation as :func:`imap`.

    Raises:
        as :func:`imap`; ProtocolError also for a malformed block or an output whose row
        shape changes between entries.
    """
    if isinstance(blocks, (Mapping, str)):  # iterating it would take its keys/characters for blocks
        raise E.ProtocolError(f"imap_arrays takes an iterable of blocks, got one {type(blocks).__name__}; "
                              "pass [block], or call map_arrays for a single block", code=E.BAD_VALUE)
    size = _chunk_size(core, chunk_size)
    plan: Plan = collections.deque()

    def take(popped: list[tuple[Ticket, int]]) -> list[ArrayResults]:
        done: list[ArrayResults] = []
        for ticket, n in popped:
            asm, offset = plan.popleft()
            asm.add(offset, n, ticket.result(0))
            if asm.complete:
                done.append(asm.finish())
                if raise_on_error:
                    done[-1].raise_for_status()
        return done

    yield from _run_window(core, model, array_entries(blocks, size, plan), take, timeout_s=timeout_s,
                           deadline_s=deadline_s, retry=retry, progress=progress)


def _chunk_size(core: ClientCore, chunk_size: int | None) -> int:
    size = core.settings.chunk_size if chunk_size is None else chunk_size
    if size < 1:
        raise E.ConfigError(f"chunk_size must be >= 1 samples per entry (1: one request per item), got {size}")
    # A chunk larger than the window would defeat it: chunks hold at most max_in_flight.
    return min(size, core.settings.max_in_flight)


def _run_window(core: ClientCore, model: str, items: Iterable[Any],
                take: Callable[[list[tuple[Ticket, int]]], Sequence[Any]], *, timeout_s: float | None,
                deadline_s: float | None, retry: Retry | None, progress: Progress) -> Flow[None]:
    """The loop of :func:`imap` and :func:`imap_arrays`: ``items`` (single items or
    :class:`Chunk` s) through a :class:`MapWindow`; ``take`` turns each run of popped
    ``(ticket, samples)`` into what is emitted."""
    wait_s = wait_seconds(timeout_s, core.settings.timeout_s)

    def prepare(source: Source, request_id: str | None) -> Ticket:
        if isinstance(source, Chunk):
            return core.new_chunk_ticket(model, source, request_id, deadline_s)
        return core.new_ticket(model, source[0], source[1], request_id, deadline_s)

    window = MapWindow(items, core.settings.max_in_flight, wait_s, prepare, core.policy(retry))
    checked = False
    try:
        while True:
            step = window.step()
            if step is Step.SEND:
                core.check_open("client")
                if not checked:
                    yield from gate(core, model)
                    checked = True
                window.sent((yield from send(core, window.to_send())))
            elif step is Step.POP:
                popped = yield from _pop(core, window, wait_s, timeout_s)
                progress.update(sum(n for _, n in popped))
                out = take(popped)
                if out:
                    yield Emit(out)
            elif step is Step.BACK_OFF:
                yield Sleep(window.back_off_s())
            else:
                return
    finally:
        progress.close()
        for t in window.outstanding():
            t.cancel()


def _pop(core: ClientCore, window: MapWindow, wait_s: float, given: float | None) -> Flow[list[tuple[Ticket, int]]]:
    oldest = window.oldest()
    while not (yield Wait(oldest, wait_s)):
        delay, again = window.resubmittable(lambda t: core.timeout_error(t, wait_s, given))
        log.info("no result for %d requests within %.3fs; submitting them again in %.2fs", len(again), wait_s, delay)
        yield Sleep(delay)
        yield from send(core, [t for t in again if not t.done()], resubmit=True)
    # The results right behind it are often in already (a worker answers a batch at once):
    # take them too, so the next send is one batch as well.
    popped = [window.popleft()]
    while window.oldest_done():
        popped.append(window.popleft())
    window.popped()
    return popped


def model_record(core: ClientCore, model: str) -> Flow[tuple[Any, int]]:
    """Read ``model``'s registry entry (refreshing the submit checks' cache)."""
    core.model_keys(model)  # checks the name
    record, now_ms = yield ReadModel(model)
    core.registry.store(model, record, now_ms)
    return record, now_ms


def model_status(core: ClientCore, model: str) -> Flow[health.ModelStatus]:
    """See ``Client.model_status``."""
    record, now_ms = yield from model_record(core, model)
    return health.model_status(model, record, now_ms)


def describe(core: ClientCore, model: str) -> Flow[health.ModelDescription]:
    """See ``Client.describe``."""
    record, now_ms = yield from model_record(core, model)
    return health.describe(model, record, now_ms)


def read_loop(core: ClientCore) -> Flow[None]:
    """The reply reader: ``XREAD`` the reply streams, resolve answered tickets, delete what
    was read. A Redis outage never ends it: it reconnects with backoff and resumes from its
    cursors."""
    backoff = BackoffPolicy(base_s=0.05, cap_s=core.settings.reconnect_backoff_max_s)
    failures = 0
    while not core.closed:
        deletes: dict[str, list[str]] = {}
        try:
            if core.reader_conn_id is None:
                core.reader_conn_id = yield ReaderId()
            deletes = core.take_deletes()
            if deletes:
                yield Delete(deletes)
            if core.closed:
                break
            reply = yield XRead(core.book.cursors(), READ_COUNT, core.settings.reply_block_ms)
        except (redis.RedisError, OSError) as e:
            core.keep_deletes(deletes)
            if core.closed:
                break
            core.reader_conn_id = None
            core.reconnects += 1
            failures += 1
            delay = backoff.delay_s(failures)
            log.warning("reply reader for client %s lost Redis (%s); retrying in %.2fs", core.client_id, e, delay)
            yield Sleep(delay)
            continue
        except Exception:  # noqa: BLE001 - the reader must survive anything; it is logged
            core.keep_deletes(deletes)
            failures += 1
            log.exception("reply reader for client %s failed; retrying", core.client_id)
            yield Sleep(backoff.delay_s(failures))
            continue
        failures = 0
        answered = core.take_replies(reply)
        if answered:
            yield Resolve(answered)
