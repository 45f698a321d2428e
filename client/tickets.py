"""Tickets (future-like handles of submitted requests) and the book that matches reply
entries to them. Shared by the thread-based :class:`Client` and the :class:`AsyncClient`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any

from headrace.client import errors as E
from headrace.client import forks, protocol
from headrace.client.protocol import Result
from headrace.client.submit import PreparedRequest, thread_timeout, wait_seconds

log = logging.getLogger(__name__)

# XREAD cursor of a reply stream nobody read yet: "0-0" rather than "$", because a result
# written between the XADD of the request and the reader's first XREAD must not be skipped.
START_ID = "0-0"


Outcome = Result | BaseException


class Ticket:
    """Handle of one submitted request; completes when its result arrives, or when it is
    cancelled (:meth:`cancel`) or forgotten (``client.forget``).

    Works from threads (:meth:`result`) and from asyncio (``await ticket``). A ticket stays
    collectable after a :class:`ResultTimeout`: the request may still be answered later.

    Attributes:
        request_id: the id on the wire (also the dedupe key on the worker side).
        model: the model the request was sent to.
        reply_to: the reply stream the result will be written to.
        deadline_ms: absolute Unix deadline in ms (0 = none).
        entry_id: id of the request stream entry of the latest (re)submission.
        submitted: ``time.monotonic()`` of the latest (re)submission.
        submissions: how many times it may have been enqueued (retries resubmit the same
            id; refused submits do not count); 0 = never, so cancelling it tells nobody.
    """

    def __init__(self, prepared: PreparedRequest, entry_id: str = "", default_timeout_s: float = 60.0,
                 canceller: Callable[[Ticket], None] | None = None) -> None:
        self.prepared = prepared
        self.request_id = prepared.request_id
        self.model = prepared.model
        self.reply_to = prepared.reply_to
        self.deadline_ms = prepared.deadline_ms
        self.entry_id = entry_id
        self.submitted = time.monotonic()
        self.submissions = 0
        self.default_timeout_s = default_timeout_s
        self._canceller = canceller
        self._born = forks.generation()  # a forked child cannot collect it (forks.check_owner)
        # The outcome (a Result or the exception that ended the ticket), _PENDING until then;
        # set once, under _lock, by _complete.
        self._state: Outcome | object = _PENDING
        self._lock = threading.Lock()
        # A concurrent.futures.Future for threads that block on the outcome (result(), the
        # sync Client's waits, add_done_callback), made by the first of them (_thread_future).
        # Made up front it cost ~9 us of the SDK's CPU per request (its threading.Condition),
        # which asyncio callers and the bulk paths never use.
        self._future: concurrent.futures.Future[Result] | None = None
        # asyncio futures of coroutines waiting for the result (see _async_waiter): resolved
        # directly when the result is delivered on their own loop, which is the AsyncClient
        # case, instead of through a thread-safe hop per ticket (asyncio.wrap_future).
        self._waiters: list[asyncio.Future[Result | None]] = []

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled() else "done" if self.done() else "pending"
        return f"Ticket(model={self.model!r}, request_id={self.request_id!r}, {state})"

    def done(self) -> bool:
        """True once the result arrived, or the ticket was cancelled or forgotten."""
        return self._state is not _PENDING

    def cancelled(self) -> bool:
        """True when the ticket was cancelled or forgotten before its result arrived."""
        return isinstance(self._state, E.RequestCancelled)

    def cancel(self) -> bool:
        """Give up on the request: waiters get :class:`RequestCancelled`, the client stops
        tracking it, and a cancel marker tells workers to skip it if they have not started
        it yet (skipped requests are acknowledged unanswered; one already running finishes,
        and its result is dropped). Never raises; Redis trouble only means the marker may
        be missing (the request then still runs, for nobody).

        Returns:
            True when the ticket was pending and is now cancelled; False when it was done,
            or was made before this process forked (the parent's request stays the parent's).
        """
        if self._born != forks.generation():
            return False
        if not self._fail(E.RequestCancelled(f"request {self.request_id} (model {self.model!r}) was cancelled",
                                             request_id=self.request_id)):
            return False
        if self._canceller is not None:
            try:
                self._canceller(self)
            except Exception:  # noqa: BLE001 - cancelling is best effort; the ticket is done either way
                log.warning("could not cancel request %s on the server side", self.request_id, exc_info=True)
        return True

    def result(self, timeout_s: float | None = None) -> Result:
        """Block until the result arrives and return it (also when it is an error result;
        call :meth:`Result.raise_for_status` to turn those into exceptions).

        Args:
            timeout_s: longest wait in seconds; None uses the client's ``timeout_s``.

        Raises:
            ResultTimeout: no result within ``timeout_s`` (the ticket stays collectable).
            RequestCancelled: the ticket was cancelled or forgotten, or its client closed.
            ConfigError: ``timeout_s`` is nan. HeadraceError: made before this process forked.
        """
        if self._state is not _PENDING:
            return self._done_outcome()
        wait = wait_seconds(timeout_s, self.default_timeout_s)  # inf: no limit
        forks.check_owner(self._born, self.request_id)
        try:
            return self._thread_future().result(timeout=thread_timeout(wait))
        except concurrent.futures.TimeoutError as e:
            raise self._timeout(wait) from e

    def _timeout(self, wait: float) -> E.ResultTimeout:
        return E.ResultTimeout(
            f"no result for request {self.request_id} (model {self.model!r}) within {wait:.3f}s; "
            "the ticket stays collectable", request_id=self.request_id, timeout_s=wait)

    async def wait(self, timeout_s: float | None = None) -> Result:
        """Async form of :meth:`result`.

        Raises:
            ResultTimeout: no result within ``timeout_s``. RequestCancelled, ConfigError,
            HeadraceError: as :meth:`result`.
        """
        if self._state is not _PENDING:
            return self._done_outcome()
        wait = wait_seconds(timeout_s, self.default_timeout_s)
        forks.check_owner(self._born, self.request_id)
        waiter = self._async_waiter()
        # The timer completes the waiter with None ("no result yet"); the waiter is private to
        # this call, so neither the timeout nor cancelling the caller touches the ticket.
        timer = waiter.get_loop().call_later(wait, _expire, waiter)
        try:
            result = await waiter
        finally:
            timer.cancel()
            if not waiter.done() or waiter.cancelled() or (waiter.exception() is None and waiter.result() is None):
                self._forget(waiter)  # timed out or cancelled: _complete did not take it
        if result is None:
            raise self._timeout(wait)
        return result

    def __await__(self) -> Generator[Any, None, Result]:
        return self.wait().__await__()

    def add_done_callback(self, fn: Callable[[Ticket], None]) -> None:
        """Call ``fn(ticket)`` when the result arrives or the ticket is cancelled (in the
        thread that completes it).

        Raises:
            HeadraceError: the ticket is pending and was made before this process was forked
                (nothing here will ever complete it).
        """
        if not self.done():
            forks.check_owner(self._born, self.request_id)
        # Through a weak reference: a closure over the ticket, kept by its own future, would
        # make every ticket with a callback a reference cycle that only the cyclic garbage
        # collector frees, and its full collections stall the event loop of a busy producer.
        # The ticket is alive whenever its future completes: completing it is a call on it.
        ref = weakref.ref(self)
        self._thread_future().add_done_callback(lambda _f: _call_back(fn, ref))

    def _thread_future(self) -> concurrent.futures.Future[Result]:
        """The ticket's ``concurrent.futures.Future`` for threads to block on (made on first
        use; done at once when the ticket already is)."""
        with self._lock:
            if self._future is None:
                fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
                if self._state is not _PENDING:
                    _set_future(fut, self._state)
                self._future = fut
            return self._future

    def _done_outcome(self) -> Result:
        """The result of a done ticket.

        Raises:
            the exception that ended it (e.g. :class:`RequestCancelled`).
        """
        state = self._state
        if isinstance(state, BaseException):
            raise state
        return state  # type: ignore[return-value]

    def _async_waiter(self) -> asyncio.Future[Result | None]:
        """A future of the running loop that completes with the result (at once when the
        ticket is done). It belongs to the caller: cancelling it, or completing it with
        None on a timeout, leaves the ticket alone. Pass it to :meth:`_forget` when giving up.
        """
        waiter: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        # Under the lock _complete takes the waiter list with: the result may be set by
        # another thread (the sync Client's reader) at any moment, and a waiter appended
        # after that list was taken would never wake.
        with self._lock:
            state = self._state
            if state is _PENDING:
                self._waiters.append(waiter)
                return waiter
        _settle_waiter(waiter, state)  # type: ignore[arg-type]
        return waiter

    def _forget(self, waiter: asyncio.Future[Result | None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass  # already taken by _complete

    def _resolve(self, result: Result) -> bool:
        return self._complete(result)

    def _fail(self, exc: BaseException) -> bool:
        return self._complete(exc)

    def _complete(self, outcome: Outcome) -> bool:
        with self._lock:
            if self._state is not _PENDING:
                return False
            self._state = outcome
            fut = self._future
            waiters, self._waiters = self._waiters, []
        # Outside the lock: a done callback may call back into the ticket. Only this call
        # sets a future made before the outcome, so it cannot be set twice.
        if fut is not None:
            _set_future(fut, outcome)
        if waiters:
            _wake(waiters, outcome)
        return True


_PENDING = object()


def _set_future(fut: concurrent.futures.Future[Result], outcome: Outcome | object) -> None:
    try:
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)  # type: ignore[arg-type]
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by whoever held it: the ticket's own outcome is set either way


def _call_back(fn: Callable[[Ticket], None], ref: weakref.ref[Ticket]) -> None:
    ticket = ref()
    if ticket is not None:
        fn(ticket)


def _expire(waiter: asyncio.Future[Result | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _settle_waiter(waiter: asyncio.Future[Result | None], outcome: Outcome) -> None:
    if waiter.done():
        return
    if isinstance(outcome, BaseException):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)


def _wake(waiters: list[asyncio.Future[Result | None]], outcome: Outcome) -> None:
    """Complete ``waiters`` with ``outcome``: directly when called on their loop (the
    AsyncClient's reader task), else through ``call_soon_threadsafe`` (the sync Client's
    reader thread, or a loop other than the reader's)."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for waiter in waiters:
        loop = waiter.get_loop()
        if loop is running:
            _settle_waiter(waiter, outcome)
        elif not loop.is_closed():
            try:
                loop.call_soon_threadsafe(_settle_waiter, waiter, outcome)
            except RuntimeError:
                pass  # the loop closed in between: nobody is waiting on it any more


class TicketBook:
    """Outstanding tickets by request id, plus the XREAD cursor of each reply stream.

    Thread-safe: the submitting threads add tickets while the reader resolves them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: dict[str, Ticket] = {}
        self._cursors: dict[str, str] = {}

    def add(self, ticket: Ticket) -> bool:
        """Track ``ticket``; return True when its reply stream is new to this book."""
        with self._lock:
            self._tickets[ticket.request_id] = ticket
            if ticket.reply_to not in self._cursors:
                self._cursors[ticket.reply_to] = START_ID
                return True
            return False

    def add_all(self, tickets: Sequence[Ticket]) -> bool:
        """Track every ticket; return True when any reply stream is new to this book."""
        new_stream = False
        for t in tickets:
            new_stream = self.add(t) or new_stream
        return new_stream

    def discard(self, ticket: Ticket) -> None:
        with self._lock:
            if self._tickets.get(ticket.request_id) is ticket:
                del self._tickets[ticket.request_id]

    def outstanding(self) -> list[Ticket]:
        with self._lock:
            return list(self._tickets.values())

    def cursors(self) -> dict[str, str]:
        """A snapshot ``{reply stream: last id read}`` for the next XREAD."""
        with self._lock:
            return dict(self._cursors)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tickets)

    def deliver(self, stream: str, entries: Sequence[tuple[Any, Mapping[bytes, bytes]]]) -> list[str]:
        """Resolve the tickets answered by ``entries`` (XREAD output of one reply stream),
        advance that stream's cursor, and return the entry ids to delete from it.

        Entries that do not decode still resolve their ticket (when the id is readable)
        with an ``error`` result carrying the decode error's code.
        """
        ids, answered = self.take(stream, entries)
        resolve_all(answered)
        return ids

    def take(self, stream: str, entries: Sequence[tuple[Any, Mapping[bytes, bytes]]]
             ) -> tuple[list[str], list[tuple[Ticket, Result]]]:
        """:meth:`deliver` without the resolving: stop tracking the answered tickets and
        advance the cursor; return the entry ids to delete and the ``(ticket, result)``
        pairs for :func:`resolve_all`."""
        ids: list[str] = []
        answered: list[tuple[Ticket, Result]] = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            ids.append(entry_id)
            try:
                result = protocol.decode_result(fields)
            except E.ProtocolError as e:
                rid = fields.get(b"id", b"").decode("utf-8", "replace")
                log.error("undecodable result %s for request %s on %s: %s", entry_id, rid, stream, e)
                result = protocol.error_result(rid, e.code, f"the result could not be decoded: {e.message}")
            with self._lock:
                ticket = self._tickets.pop(result.request_id, None)
            if ticket is None:
                # A result for a ticket this client no longer tracks (it was answered
                # already, or belongs to an earlier client with the same id): drop it.
                log.debug("result %s for unknown request %s on %s dropped", entry_id, result.request_id, stream)
                continue
            answered.append((ticket, result))
        if ids:
            with self._lock:
                self._cursors[stream] = ids[-1]
        return ids, answered


def resolve_all(answered: Iterable[tuple[Ticket, Result]]) -> None:
    """Complete each ticket with its result (see :meth:`TicketBook.take`)."""
    for ticket, result in answered:
        if not ticket._resolve(result):
            log.debug("duplicate result for request %s dropped", result.request_id)


def ordered_results(tickets: Iterable[Ticket]) -> list[Result]:
    """Results of tickets that are all done, in the given order.

    Raises:
        RequestCancelled: one of them was cancelled.
    """
    return [t._done_outcome() for t in tickets]
