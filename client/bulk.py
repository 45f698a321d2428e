"""The bookkeeping of ``map``/``imap`` (:class:`MapWindow`), shared by both clients: an
input-ordered window of requests submitted in pipelined batches, with backpressure and retries.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from headrace.client import errors as E
from headrace.client.chunks import Chunk
from headrace.client.pipeline import MAX_PIPELINE
from headrace.client.retry import Attempts, Retry
from headrace.client.submit import split_item
from headrace.client.tickets import Ticket

log = logging.getLogger(__name__)

MapItem = str | Mapping[str, Any]
"""One ``map`` item: a text input, or named input arrays (one sample each)."""
Source = Chunk | tuple[Mapping[str, Any] | None, str | None]
"""What one request of ``map`` is prepared from: a chunk of items, or one item's ``(inputs, text)``."""


class Step(Enum):
    """What a ``map`` driver does next (see :meth:`MapWindow.step`)."""

    SEND = "send"          # submit MapWindow.to_send() as one pipeline, report with sent()
    POP = "pop"            # wait for oldest(), then take popleft() while oldest_done(); popped()
    BACK_OFF = "back_off"  # the queue is full and nothing of ours is out: sleep back_off_s()
    DONE = "done"


@dataclass
class _Slot:
    """One request of a map in input order (one item, or a chunk of ``size`` items): what it
    is prepared from, and its ticket once prepared."""

    source: Source | None
    size: int = 1
    ticket: Ticket | None = None
    sent: bool = False
    first_refused: float = 0.0  # time.monotonic() of its first refusal; 0.0 = none
    attempts: Attempts | None = None  # its retry state (with a retry policy)


class MapWindow:
    """Input-ordered window of ``map`` requests holding at most ``max_in_flight`` samples.

    A driver (the sync or the async ``imap``) loops on :meth:`step`. Requests go out in
    batches: every item the window has room for is prepared and submitted in one pipeline,
    and a driver that pops a result also pops the results right behind it that are already
    in, so room (and the next batch) comes in the size the workers answer in. A request
    refused with :class:`QueueFull` keeps its place in the order; after the driver popped
    one of our results (or, with none out, backed off) it is prepared again (a fresh
    deadline, the same request id) and resent, until it has been refused for ``wait_s``.
    With a ``retry`` policy, a request Redis failed under (:class:`BrokerError`) is resent
    the same way, and a request whose result did not come within ``wait_s`` is submitted
    again (:meth:`resubmittable`), each within its own attempts.

    Args:
        items: the map items (``str``, mapping or :class:`Chunk` each), read lazily as
            room frees up.
        max_in_flight: most samples outstanding (a chunk counts its items).
        wait_s: longest time one request may be refused before :class:`QueueFull` is raised.
        prepare: ``prepare(source, request_id)`` -> a new, unsent :class:`Ticket`
            (``request_id`` None picks a new id).
        retry: the retry policy (None: broker errors and timeouts are raised at once).
    """

    def __init__(self, items: Iterable[Any], max_in_flight: int, wait_s: float,
                 prepare: Callable[[Source, str | None], Ticket],
                 retry: Retry | None = None) -> None:
        self._retry_policy = retry
        self._items: Iterator[Any] | None = iter(items)
        self._max_in_flight = max_in_flight
        self._wait_s = wait_s
        self._prepare = prepare
        self._window: collections.deque[_Slot] = collections.deque()
        self._samples = 0  # samples of the requests in the window
        self._unsent: list[_Slot] = []  # in input order: refused ones first, then new ones
        self._retry = False  # refused requests may be resent (after a pop or a back-off)
        self._backoff_s = 0.01

    def step(self) -> Step:
        """What to do next."""
        if self._unsent:
            if self._retry or not self._unsent[0].first_refused:
                return Step.SEND
            # The queue is full: make room by taking our own oldest result, else wait.
            return Step.POP if self._window[0].sent else Step.BACK_OFF
        if self._items is not None and self._samples < self._max_in_flight:
            return Step.SEND
        return Step.POP if self._window else Step.DONE

    def to_send(self) -> list[Ticket]:
        """For SEND: read items while there is room and (re)prepare every unsent one; return
        their tickets in input order, for one pipeline (at most ``MAX_PIPELINE``).

        Raises:
            ProtocolError: an item is neither ``str`` nor a mapping, or is invalid.
        """
        while (self._items is not None and self._samples < self._max_in_flight
               and len(self._unsent) < MAX_PIPELINE):
            try:
                item = next(self._items)
            except StopIteration:
                self._items = None
                break
            slot = _Slot(item, item.size) if isinstance(item, Chunk) else _Slot(split_item(item))
            self._samples += slot.size
            self._window.append(slot)
            self._unsent.append(slot)
        tickets: list[Ticket] = []
        for slot in self._unsent[:MAX_PIPELINE]:
            rid = slot.ticket.request_id if slot.ticket is not None else None
            assert slot.source is not None
            slot.ticket = self._prepare(slot.source, rid)
            if self._retry_policy is not None:
                if slot.attempts is None:
                    slot.attempts = self._retry_policy.start(slot.ticket.deadline_ms)
                slot.attempts.deadline_ms = slot.ticket.deadline_ms
            tickets.append(slot.ticket)
        return tickets

    def sent(self, errors: list[E.HeadraceError | None]) -> None:
        """Report the outcome of each ticket :meth:`to_send` returned (None = enqueued).

        Raises:
            HeadraceError: the first error other than :class:`QueueFull` that the retry
                policy does not retry (e.g. :class:`BrokerError` out of attempts).
            QueueFull: a request has been refused for longer than ``wait_s``.
        """
        batch, rest = self._unsent[:len(errors)], self._unsent[len(errors):]
        refused: list[_Slot] = []
        refusal: E.HeadraceError | None = None
        now = time.monotonic()
        for slot, err in zip(batch, errors, strict=True):
            if err is None:
                slot.sent = True
                slot.source = None  # encoded in the ticket: let the caller's arrays go
            elif isinstance(err, E.QueueFull) or self._retries(slot, err):
                slot.first_refused = slot.first_refused or now
                if isinstance(err, E.QueueFull):
                    refusal = refusal or err
                refused.append(slot)
            else:
                self._unsent = refused + rest
                raise err
        self._unsent = refused + rest
        self._retry = False
        if not refused:
            self._backoff_s = 0.01
        elif refusal is not None and now - refused[0].first_refused > self._wait_s:
            raise refusal

    def _retries(self, slot: _Slot, err: E.HeadraceError) -> bool:
        if slot.attempts is None or slot.attempts.next_delay(err) is None:
            return False
        log.info("retrying request %s after: %s", slot.ticket.request_id if slot.ticket else "?", err)
        return True

    def resubmittable(self, timeout: Callable[[Ticket], E.ResultTimeout]) -> tuple[float, list[Ticket]]:
        """For a POP whose wait timed out: ``(delay, tickets)`` to submit again (same ids)
        after ``delay`` seconds: the oldest, and every other sent, unanswered ticket that
        has waited ``wait_s`` too, each within its own attempts.

        Raises:
            ResultTimeout: ``timeout(oldest)``, when the policy allows the oldest no more.
        """
        head = self._window[0]
        assert head.ticket is not None
        err = timeout(head.ticket)
        delay = head.attempts.next_delay(err) if head.attempts is not None else None
        if delay is None:
            raise err
        now = time.monotonic()
        out = [head.ticket]
        for slot in list(self._window)[1:]:
            t = slot.ticket
            if (slot.sent and t is not None and not t.done() and now - t.submitted >= self._wait_s
                    and slot.attempts is not None and slot.attempts.next_delay(err) is not None):
                out.append(t)
        return delay, out

    def outstanding(self) -> list[Ticket]:
        """Sent tickets not answered yet (to cancel when the map is abandoned)."""
        return [s.ticket for s in self._window if s.sent and s.ticket is not None and not s.ticket.done()]

    def oldest(self) -> Ticket:
        """For POP: the oldest ticket (sent); wait for its result, then :meth:`popleft`."""
        slot = self._window[0]
        assert slot.sent and slot.ticket is not None
        return slot.ticket

    def popleft(self) -> tuple[Ticket, int]:
        """Remove the oldest ticket (its result is in); return it and its items' count
        (more than 1: a chunk, whose result holds one slot per item)."""
        slot = self._window.popleft()
        self._samples -= slot.size
        assert slot.ticket is not None
        return slot.ticket, slot.size

    def oldest_done(self) -> bool:
        """True when the oldest ticket is sent and its result is in already."""
        if not self._window:
            return False
        slot = self._window[0]
        return slot.sent and slot.ticket is not None and slot.ticket.done()

    def popped(self) -> None:
        """A POP is over: refused requests may be resent."""
        self._retry = True

    def back_off_s(self) -> float:
        """For BACK_OFF: how long to sleep (seconds, doubling up to 1 s while refusals go on);
        resending is allowed after it."""
        s = self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, 1.0)
        self._retry = True
        return s
