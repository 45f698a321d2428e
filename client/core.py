"""The sans-IO core shared by :class:`~headrace.client.Client` and
:class:`~headrace.client.AsyncClient`: settings, key names, request preparation, the ticket
book, what a submit reply means, cancel markers, the reply reader's bookkeeping and the
registry cache. It never touches a socket; the flows in :mod:`headrace.client.flows` say
what IO to do, and each client shell does it in its own way (threads or asyncio).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.backoff import AbstractBackoff

from headrace.client import errors as E
from headrace.client.backoff import BackoffPolicy
from headrace.client.chunks import Chunk, prepare_chunk
from headrace.client.config import ClientSettings
from headrace.client.failures import broker_error, refused_unsent
from headrace.client.health import RegistryCache
from headrace.client.keys import ModelKeys, partition_keys, partition_of
from headrace.client.pipeline import Command
from headrace.client.protocol import Result, check_request_id
from headrace.client.retry import Retry
from headrace.client.submit import new_request_id, parse_reply, prepare_request, refusal, submit_command
from headrace.client.tickets import Ticket, TicketBook

log = logging.getLogger(__name__)

READ_COUNT = 512
"""Entries one reply-stream ``XREAD`` returns at most per stream."""


def check_retry(retry: Retry | None) -> Retry | None:
    """``retry`` as given (a client's or a call's policy), refused when not a :class:`Retry`.

    Raises:
        ConfigError: anything else but None (``retry=3`` would fail deep inside the call).
    """
    if retry is not None and not isinstance(retry, Retry):
        raise E.ConfigError(f"retry must be a headrace.client.Retry (or None for the default policy), got "
                            f"{type(retry).__name__} {retry!r}", field="retry")
    return retry


def default_retry(settings: ClientSettings) -> Retry:
    """The client's retry policy when none is given: ``retry_attempts`` submissions when
    Redis fails under a submit (:class:`BrokerError`) only."""
    return Retry(attempts=settings.retry_attempts,
                 backoff=BackoffPolicy(base_s=0.05, cap_s=settings.reconnect_backoff_max_s), on=(E.BrokerError,))


class RedisBackoff(AbstractBackoff):
    """:class:`BackoffPolicy` as a redis-py backoff (for its connection-level ``Retry``)."""

    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy

    def compute(self, failures: int) -> float:
        return self.policy.delay_s(failures)


def connection_options(settings: ClientSettings) -> dict[str, Any]:
    """redis-py options of the clients' pooled connections: a broken connection (Redis
    restarted) is retried ``connect_retries`` times with backoff, and one idle for
    ``health_check_interval_s`` is PINGed before use, so the first call after a restart
    succeeds. (``retry`` itself is added by each shell: redis-py has a sync and an
    asyncio ``Retry``.)"""
    return {"health_check_interval": settings.health_check_interval_s}


def connection_backoff(settings: ClientSettings) -> RedisBackoff:
    return RedisBackoff(BackoffPolicy(base_s=0.02, cap_s=min(1.0, settings.reconnect_backoff_max_s)))


class ClientCore:
    """State and decisions of one client (thread-safe where the sync client needs it).

    Args:
        settings: resolved client settings.
        client_id: names this client's reply streams.
        retry: the client's default retry policy (None: :func:`default_retry`).

    Raises:
        ConfigError: ``retry`` is not a :class:`Retry`.

    Attributes:
        book: the outstanding tickets and the reader's cursors.
        registry: cached registry reads for the submit checks.
        closed: set by the shell's ``close``.
        reader_conn_id: CLIENT ID of the reader's connection while it is connected.
        reconnects: how often the reader lost Redis.
        cancel_sink: where cancel-marker commands go (set by the shell; best effort).
    """

    def policy(self, retry: Retry | None) -> Retry:
        """A call's ``retry``, or the client's when None.

        Raises:
            ConfigError: ``retry`` is not a :class:`Retry`.
        """
        return check_retry(retry) or self.retry

    def __init__(self, settings: ClientSettings, client_id: str, retry: Retry | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.retry = check_retry(retry) or default_retry(settings)
        self.book = TicketBook()
        self.registry = RegistryCache(settings.registry_cache_s)
        self.closed = False
        self.reader_conn_id: int | None = None
        self.reconnects = 0
        self.cancel_sink: Callable[[Command], None] | None = None
        self._keys: dict[str, ModelKeys] = {}
        self._partitions: dict[str, list[ModelKeys]] = {}
        self._to_delete: dict[str, list[str]] = {}

    # --- requests --------------------------------------------------------------------------

    def model_keys(self, model: str) -> ModelKeys:
        """Key names of ``model`` in this client's namespace.

        Raises:
            ConfigError: an invalid model name.
        """
        keys = self._keys.get(model)
        if keys is None:
            keys = self._keys[model] = ModelKeys(namespace=self.settings.namespace, model=model)
        return keys

    def keys_for(self, model: str, request_id: str) -> ModelKeys:
        """Key names of the partition of ``model`` that ``request_id`` goes to
        (``crc32(request_id) % partitions``; the model's own keys when it has one).

        Raises:
            ConfigError: an invalid model name.
        """
        if self.settings.partitions == 1:
            return self.model_keys(model)
        parts = self._partitions.get(model)
        if parts is None:
            parts = self._partitions[model] = partition_keys(self.settings.namespace, model, self.settings.partitions)
        return parts[partition_of(request_id, self.settings.partitions)]

    def reply_stream(self, model: str) -> str:
        return self.model_keys(model).reply(self.client_id)

    def check_open(self, what: str) -> None:
        if self.closed:
            raise E.HeadraceError(f"this {what} is closed; create a new one")

    def new_ticket(self, model: str, inputs: Mapping[str, Any] | None, text: str | None,
                   request_id: str | None, deadline_s: float | None) -> Ticket:
        """Prepare one request (not sent yet).

        Raises:
            ProtocolError: invalid inputs or request id. ConfigError: invalid model name.
        """
        request_id, keys = self._route(model, request_id)
        prepared = prepare_request(keys, keys.reply(self.client_id), inputs, text, request_id=request_id,
                                   deadline_s=self._deadline_s(deadline_s))
        return Ticket(prepared, default_timeout_s=self.settings.timeout_s, canceller=self._cancelled)

    def new_chunk_ticket(self, model: str, chunk: Chunk, request_id: str | None, deadline_s: float | None) -> Ticket:
        """Prepare one multi-sample request of ``chunk`` (not sent yet).

        Raises:
            ProtocolError: invalid inputs or request id. ConfigError: invalid model name.
        """
        request_id, keys = self._route(model, request_id)
        prepared = prepare_chunk(keys, keys.reply(self.client_id), chunk, request_id=request_id,
                                 deadline_s=self._deadline_s(deadline_s))
        return Ticket(prepared, default_timeout_s=self.settings.timeout_s, canceller=self._cancelled)

    def _route(self, model: str, request_id: str | None) -> tuple[str, ModelKeys]:
        """The request id (a new one when None) and the keys of the partition it picks.

        Raises:
            ProtocolError: an invalid id on a partitioned model (checked before it routes).
        """
        if request_id is None:
            request_id = new_request_id()
        elif self.settings.partitions > 1:
            check_request_id(request_id)  # it picks the partition: reject a bad one first
        return request_id, self.keys_for(model, request_id)

    def _deadline_s(self, deadline_s: float | None) -> float:
        return self.settings.deadline_s if deadline_s is None else deadline_s

    def checked(self, model: str) -> bool:
        """True when ``submit``'s registry checks pass without reading the registry (they
        are off, the registry is unreadable, or a fresh read says yes).

        Raises:
            UnknownModel, ModelUnavailable: a fresh read says no.
        """
        s = self.settings
        if not (s.require_registered or s.fail_fast) or self.registry.unreadable:
            return True
        if not self.registry.fresh(model):
            return False
        self.registry.check(model, require_registered=s.require_registered, fail_fast=s.fail_fast,
                            namespace=s.namespace, partitions=s.partitions)
        return True

    def register(self, tickets: Sequence[Ticket]) -> tuple[bool, list[Command]]:
        """Track ``tickets`` (before their submit: the result may come before the function's
        reply does) and build their submit commands; True when a reply stream is new."""
        new_stream = self.book.add_all(tickets)
        max_backlog = self.settings.max_backlog
        commands = []
        for t in tickets:
            t.submissions += 1
            commands.append(submit_command(self.keys_for(t.model, t.request_id), t.prepared, max_backlog))
        return new_stream, commands

    def settle_all(self, tickets: Sequence[Ticket], replies: Sequence[Any], *,
                   resubmit: bool = False) -> list[E.HeadraceError | None]:
        """Per ticket, the error that refused it (None when enqueued). Refused tickets are no
        longer tracked, unless ``resubmit``: an earlier submission may still be answered."""
        errors: list[E.HeadraceError | None] = []
        for t, reply in zip(tickets, replies, strict=True):
            err = self._settle(t, reply)
            if err is not None and not resubmit and not t.done():
                self.book.discard(t)
            errors.append(err)
        return errors

    def _settle(self, ticket: Ticket, reply: Any) -> E.HeadraceError | None:
        """Apply the submit function's answer (or the redis-py error its command got); on
        success ``ticket.entry_id`` and ``ticket.submitted`` are set. A refusal of the
        function (its wire code) or a missing function means nothing was added."""
        refused = refusal(reply, ticket.prepared) if isinstance(reply, Exception) else None
        if refused is not None:
            refused.__cause__ = reply
            ticket.submissions -= 1  # nothing enqueued: no cancel marker needed for this one
            return refused
        if isinstance(reply, BaseException):
            where = f"submitting request {ticket.request_id} to {ticket.prepared.stream}"
            if refused_unsent(reply):
                ticket.submissions -= 1
                return broker_error(reply, f"{where} (refused by Redis, nothing was enqueued)", ticket.request_id)
            return broker_error(reply, f"{where} (it may or may not have been enqueued: retrying with the same "
                                "request_id is safe)", ticket.request_id)
        try:
            ticket.entry_id = parse_reply(reply, ticket.prepared, self.settings.max_backlog)
        except E.QueueFull as e:
            ticket.submissions -= 1
            return self._queue_full(ticket, e)
        except E.HeadraceError as e:
            return e
        ticket.submitted = time.monotonic()
        log.debug("submitted request %s to %s as %s", ticket.request_id, ticket.prepared.stream, ticket.entry_id)
        return None

    def _queue_full(self, ticket: Ticket, err: E.QueueFull) -> E.QueueFull:
        s = self.settings
        out = E.QueueFull(
            f"model {ticket.model!r} has a backlog of {err.backlog} samples (max_backlog={s.max_backlog}); "
            f"request {ticket.request_id} was not enqueued: retry later, add workers, or raise "
            f"{s.setting_hint('max_backlog')}", backlog=err.backlog, max_backlog=s.max_backlog,
            retry_after_s=self.registry.retry_after_s(ticket.model), request_id=ticket.request_id, model=ticket.model)
        out.__cause__ = err.__cause__
        return out

    def timeout_error(self, ticket: Ticket, wait_s: float, given: float | None) -> E.ResultTimeout:
        """:class:`ResultTimeout` for ``ticket``, naming the timeout as the caller set it."""
        how = "the timeout_s argument" if given is not None else self.settings.setting_hint("timeout_s")
        return E.ResultTimeout(f"no result for request {ticket.request_id} (model {ticket.model!r}) within "
                               f"{wait_s:.3f}s (the client stopped waiting; raise {how} to wait longer)",
                               request_id=ticket.request_id, timeout_s=wait_s)

    # --- cancelling ---------------------------------------------------------------------

    def forget(self, ticket: Ticket) -> bool:
        """Stop tracking ``ticket`` without telling the workers; its waiters get
        :class:`RequestCancelled`. False when it was done already."""
        self.book.discard(ticket)
        return ticket._fail(E.RequestCancelled(f"request {ticket.request_id} was forgotten by this client",
                                               request_id=ticket.request_id))

    def cancel(self, ticket: Ticket) -> bool:
        """:meth:`Ticket.cancel`: forget it and set its cancel marker."""
        return ticket.cancel()

    def _cancelled(self, ticket: Ticket) -> None:
        # The ticket's canceller: it is done (RequestCancelled) already.
        self.book.discard(ticket)
        if ticket.submissions and self.cancel_sink is not None:
            self.cancel_sink(self.cancel_command(ticket))

    def cancel_command(self, ticket: Ticket) -> Command:
        """``SET <cancel marker> <ts_ms> EX <ttl>``: workers skip submissions of the id made
        at or before ``ts_ms`` (this ticket's, resubmissions included; a later fresh submit
        of the same id is not affected). The marker outlives the request's deadline, after
        which workers answer ``expired`` without running it anyway."""
        ttl = self.settings.cancel_ttl_s
        if ticket.deadline_ms:
            ttl = max(1, min(ttl, math.ceil((ticket.deadline_ms - time.time() * 1000) / 1000) + 5))
        ts = ticket.prepared.fields.get(b"ts_ms", b"0")
        return ("SET", self.keys_for(ticket.model, ticket.request_id).cancel(ticket.request_id), ts, "EX", ttl)

    # --- the reply reader ---------------------------------------------------------------

    def take_replies(self, reply: Any) -> list[tuple[Ticket, Result]]:
        """Match an ``XREAD`` reply to tickets: stop tracking the answered ones, advance the
        cursors and note the entries to delete; return ``(ticket, result)`` pairs."""
        answered: list[tuple[Ticket, Result]] = []
        for stream_raw, entries in reply or []:
            stream = stream_raw.decode() if isinstance(stream_raw, bytes) else str(stream_raw)
            ids, got = self.book.take(stream, entries)
            answered += got
            if ids:
                self._to_delete.setdefault(stream, []).extend(ids)
        return answered

    def take_deletes(self) -> dict[str, list[str]]:
        """The consumed reply entries to ``XDEL`` (this client is their only reader)."""
        out, self._to_delete = self._to_delete, {}
        return out

    def keep_deletes(self, pending: Mapping[str, list[str]]) -> None:
        """Put back deletes that failed (Redis down), for the next round."""
        for stream, ids in pending.items():
            self._to_delete.setdefault(stream, [])[:0] = ids

    def shut(self, what: str) -> list[str]:
        """Close this core: no new calls, and every outstanding ticket fails at once with
        :class:`RequestCancelled`, so callers blocked on one (``result``, ``map``, ``await``)
        return instead of waiting out their timeout for a reader that is stopping. Returns
        the reply streams to delete (see :meth:`streams_to_drop`, decided before the tickets
        are dropped: streams that still expect results are left to expire)."""
        streams = self.streams_to_drop()
        self.closed = True
        for t in self.book.outstanding():
            self.book.discard(t)
            t._fail(E.RequestCancelled(
                f"request {t.request_id} (model {t.model!r}) was given up: its {what} was closed before the result "
                "arrived (the request may still run; its result is dropped)", request_id=t.request_id))
        return streams

    def streams_to_drop(self) -> list[str]:
        """Reply streams to delete on close: all of them when nothing is outstanding (else
        they expire by ``reply_ttl_s``)."""
        return [] if self.book.outstanding() else list(self.book.cursors())
