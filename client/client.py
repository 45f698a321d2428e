"""The thread-based SDK client: submit requests, collect results from one reply stream per
model, read by a background thread with blocking ``XREAD``.

    from headrace.client import Client, Retry
    with Client("redis://127.0.0.1:6379/0") as c:
        emb = c.infer("minilm", text="A sentence.").outputs["embeddings"]
        res = c.infer("affine", {"x": x}, timeout_s=2, retry=Retry(attempts=5))
        results = c.map("affine", ({"x": v} for v in vectors))      # input order

The protocol's loops live in :mod:`headrace.client.flows` (shared with the
:class:`~headrace.client.AsyncClient`); this class performs their IO with blocking calls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from types import TracebackType
from typing import Any, TypeVar

import redis

from headrace.client import flows
from headrace.client.arrays import ArrayResults, one_block
from headrace.client.bulk import MapItem
from headrace.client.config import ClientSettings
from headrace.client.core import ClientCore
from headrace.client.effects import Flow
from headrace.client.failures import broker_error
from headrace.client.forks import PerProcess
from headrace.client.health import ModelDescription, ModelStatus
from headrace.client.progress import ProgressOption, make_progress
from headrace.client.protocol import Result
from headrace.client.retry import Retry
from headrace.client.submit import resolve_settings
from headrace.client.sync_io import SyncIO
from headrace.client.tickets import Ticket
from headrace.client.views import CoreViews

log = logging.getLogger(__name__)
T = TypeVar("T")


class Client(CoreViews):
    """Submit inference requests and collect their results (thread-safe).

    Args:
        redis_url: ``redis://`` / ``rediss://`` URL (ACL user and password included), passed
            straight to ``redis.Redis.from_url``; None uses ``HEADRACE_REDIS_URL``.
        namespace: key namespace shared with the workers; None uses ``HEADRACE_NAMESPACE``.
        settings: full :class:`ClientSettings`; None builds them from the environment.
        client_id: names this client's reply streams; None picks a unique one (a forked
            child process always picks a new one). Reuse an id only to pick up results of a
            previous client that is gone.
        retry: the default :class:`Retry` of every call; None retries only submits Redis
            failed under, ``retry_attempts`` times.
        **overrides: any other :class:`ClientSettings` field (``max_backlog``, ``timeout_s``...).

    Raises:
        ConfigError: an invalid setting.
    """

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None,
                 settings: ClientSettings | None = None, client_id: str | None = None, retry: Retry | None = None,
                 **overrides: Any) -> None:
        self.settings, cid = resolve_settings(settings, client_id, redis_url=redis_url, namespace=namespace,
                                              **overrides)
        self._proc: PerProcess[SyncIO] = PerProcess(ClientCore(self.settings, cid, retry), SyncIO)

    @property
    def _io(self) -> SyncIO:
        return self._proc.current()[1]

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader and close connections. Outstanding tickets fail at once with
        :class:`RequestCancelled` (threads blocked in ``result``/``map`` return; the requests
        may still run, their results are dropped). Reply streams with nothing outstanding
        are deleted; others expire by their TTL (``reply_ttl_s``)."""
        self._io.close()

    def ping(self) -> bool:
        """True when Redis answers.

        Raises:
            BrokerError: Redis is unreachable.
        """
        try:
            return bool(self._io.redis.ping())
        except redis.RedisError as e:
            raise broker_error(e, f"PING of Redis at {self._io.safe_url()}") from e

    @property
    def _redis(self) -> redis.Redis:
        return self._io.redis

    # --- health ----------------------------------------------------------------------------

    def model_status(self, model: str) -> ModelStatus:
        """Live workers, versions, backlog and recent latency of ``model``, from the registry
        its workers heartbeat into (one round trip). ``.ready`` answers a readiness probe.

        Raises:
            ConfigError: an invalid model name. BrokerError: Redis failed.
        """
        return self._run(flows.model_status(self._core, model))

    def describe(self, model: str) -> ModelDescription:
        """Versions served, per-version signature and batching limits of ``model``.

        Raises:
            UnknownModel: no worker ever registered it. BrokerError: Redis failed.
        """
        return self._run(flows.describe(self._core, model))

    # --- submitting ----------------------------------------------------------------------

    def submit(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
               request_id: str | None = None, deadline_s: float | None = None, retry: Retry | None = None) -> Ticket:
        """Enqueue one request; return its :class:`Ticket` at once.

        Args:
            model: served model name.
            inputs: named arrays, one sample each (no batch dimension).
            text: a text input instead of ``inputs``.
            request_id: your id (idempotency key); None picks a unique one.
            deadline_s: answer ``expired`` instead of running after this many seconds;
                None uses ``settings.deadline_s`` (0 = no deadline).
            retry: this call's retry policy (default: the client's); it retries the submit
                itself (broker errors, and a full queue when ``QueueFull`` is in ``retry.on``).

        Raises:
            UnknownModel: no worker ever registered ``model`` (``require_registered``).
            ModelUnavailable: ``fail_fast`` and no live worker serves ``model``.
            QueueFull: the model's backlog reached ``max_backlog``; nothing was enqueued.
            ProtocolError: invalid inputs or request id.
            BrokerError: Redis failed (the request may or may not have been enqueued;
                retry with the same ``request_id`` to stay effectively-once).
        """
        self._core.check_open("Client")
        ticket = self._core.new_ticket(model, inputs, text, request_id, deadline_s)
        policy = self._core.policy(retry)
        self._run(flows.submit(self._core, ticket, policy.start(ticket.deadline_ms)))
        return ticket

    def resubmit(self, ticket: Ticket) -> Ticket:
        """Enqueue ``ticket``'s request again with the same request id (after Redis lost
        data, e.g. a restart without persistence). Safe when the first one still runs:
        the workers' dedupe answers a request id once. A done ticket is returned as is.
        A ``retry=`` policy on ``infer``/``map`` does this by itself.

        Raises:
            QueueFull, BrokerError: as :meth:`submit` (the ticket stays tracked).
        """
        self._core.check_open("Client")
        if not ticket.done():
            attempts = self._core.retry.start(ticket.deadline_ms)
            self._run(flows.submit(self._core, ticket, attempts, check=False, resubmit=True))
        return ticket

    def forget(self, ticket: Ticket) -> bool:
        """Stop tracking ``ticket`` (its waiters get :class:`RequestCancelled`); the workers
        are not told, so the request may still run. Use ``ticket.cancel()`` to also have
        them skip it. Returns False when it was done already."""
        return self._core.forget(ticket)

    # --- collecting ----------------------------------------------------------------------

    def result(self, ticket: Ticket, timeout_s: float | None = None) -> Result:
        """Wait for ``ticket``'s result. See :meth:`Ticket.result`.

        Raises:
            ResultTimeout: no result within ``timeout_s`` (default ``settings.timeout_s``).
            RequestCancelled: the ticket was cancelled or forgotten.
        """
        return ticket.result(timeout_s)

    def infer(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
              request_id: str | None = None, deadline_s: float | None = None, timeout_s: float | None = None,
              raise_on_error: bool = True, retry: Retry | None = None) -> Result:
        """Submit one request and wait for its result.

        Args:
            timeout_s: wait per attempt (default ``settings.timeout_s``).
            raise_on_error: raise for ``error``/``rejected``/``expired`` results instead of
                returning them.
            retry: this call's :class:`Retry` (default: the client's). With
                ``ResultTimeout`` in ``retry.on``, a request unanswered after ``timeout_s``
                is submitted again with the same id, within ``retry.attempts`` and its deadline.

        When the call ends without a result (timeout, error, an interrupted caller) its
        request is cancelled: workers skip it if they have not started it.

        Raises:
            UnknownModel, ModelUnavailable, QueueFull, ProtocolError, BrokerError: as :meth:`submit`.
            ResultTimeout: no result in time (a :class:`TimeoutError`).
            InferenceFailed: the result is an error and ``raise_on_error`` (``.code`` says why).
            RequestExpired: the deadline passed before it ran and ``raise_on_error``.
        """
        self._core.check_open("Client")
        ticket = self._core.new_ticket(model, inputs, text, request_id, deadline_s)
        res = self._run(flows.infer(self._core, ticket, timeout_s, retry))
        return res.raise_for_status() if raise_on_error else res

    def collect(self, tickets: Sequence[Ticket], timeout_s: float | None = None, *,
                raise_on_error: bool = False) -> list[Result]:
        """Wait for all ``tickets``; return their results in the given order.

        Args:
            timeout_s: longest wait for all of them together (default ``settings.timeout_s``).

        Raises:
            ResultTimeout: not all results arrived in time (the tickets stay collectable).
            RequestCancelled: one of them was cancelled.
            InferenceFailed, RequestExpired: with ``raise_on_error``, for the first failed one.
        """
        results = self._run(flows.collect(self._core, tickets, timeout_s))
        if raise_on_error:
            for r in results:
                r.raise_for_status()
        return results

    def results(self, tickets: Iterable[Ticket], timeout_s: float | None = None) -> Iterator[Result]:
        """Yield results as they arrive (completion order).

        Raises:
            ResultTimeout: the rest did not arrive within ``timeout_s`` in total.
            RequestCancelled: one of them was cancelled.
        """
        return self._io.iterate(flows.results(self._core, tickets, timeout_s))

    def outstanding(self) -> list[Ticket]:
        """Tickets submitted by this client and not answered, cancelled or forgotten yet."""
        return self._core.book.outstanding()

    # --- bulk ----------------------------------------------------------------------------

    def imap(self, model: str, items: Iterable[MapItem], *, progress: ProgressOption = None,
             timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
             total: int | None = None, retry: Retry | None = None, chunk_size: int | None = None) -> Iterator[Result]:
        """Like :meth:`map` but yields each result (in input order) as soon as it and all
        earlier ones are in. Requests still out when the iteration stops early are cancelled."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        bar = make_progress(progress, total, model)
        return self._io.iterate(flows.imap(self._core, model, items, timeout_s=timeout_s, deadline_s=deadline_s,
                                           retry=retry, progress=bar, raise_on_error=raise_on_error,
                                           chunk_size=chunk_size))

    def map(self, model: str, items: Iterable[MapItem], *, progress: ProgressOption = None,
            timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
            total: int | None = None, retry: Retry | None = None, chunk_size: int | None = None) -> list[Result]:
        """Run ``model`` on every item with at most ``settings.max_in_flight`` samples
        outstanding; return the results in input order. Consecutive items that fit together
        go out as multi-sample entries of up to ``chunk_size`` (default
        ``settings.chunk_size``; 1 sends one request per item); each item still gets its own
        result (a sample's error the way a single request's would be). While the queue is full
        (:class:`QueueFull`) it waits and retries instead of failing. Requests are
        submitted in batches, one Redis round trip for all there is room for.

        Args:
            items: ``str`` items are text inputs, mappings are named input arrays.
            progress: None: a tqdm bar when stderr is a terminal; True/False: always/never;
                a callable ``fn(done, total)`` instead of a bar.
            timeout_s: longest wait for any one result (per attempt), and for the queue
                to take a request.
            raise_on_error: raise on the first non-ok result instead of returning it.
            total: length for the progress bar when ``items`` has no ``len``.
            retry: the retry policy (default: the client's); with ``ResultTimeout`` in
                ``retry.on``, unanswered requests are submitted again (same ids).

        Raises:
            UnknownModel, ModelUnavailable: as :meth:`submit`.
            ProtocolError: an item is neither ``str`` nor a mapping, or is invalid.
            ResultTimeout: a result did not arrive within ``timeout_s``.
            QueueFull: the queue refused requests for longer than ``timeout_s``.
            BrokerError: Redis failed.
            InferenceFailed, RequestExpired: with ``raise_on_error``.
        """
        return list(self.imap(model, items, progress=progress, timeout_s=timeout_s, deadline_s=deadline_s,
                              raise_on_error=raise_on_error, total=total, retry=retry,
                              chunk_size=chunk_size))

    def imap_arrays(self, model: str, blocks: Iterable[Mapping[str, Any] | Sequence[str]], *,
                    progress: ProgressOption = None,
                    timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = True,
                    total: int | None = None, retry: Retry | None = None,
                    chunk_size: int | None = None) -> Iterator[ArrayResults]:
        """Like :meth:`map_arrays` for a stream of blocks (each a mapping of input name ->
        array with a leading sample axis, e.g. the batches of a data loader, or a list of
        texts for a text model): yields one
        :class:`ArrayResults` per block, in input order, while later blocks are in flight.
        ``total`` (for the progress bar) counts samples."""
        bar = make_progress(progress, total, model)
        return self._io.iterate(flows.imap_arrays(self._core, model, blocks, timeout_s=timeout_s,
                                                  deadline_s=deadline_s, retry=retry, progress=bar,
                                                  raise_on_error=raise_on_error, chunk_size=chunk_size))

    def map_arrays(self, model: str, inputs: Mapping[str, Any] | None = None, *, texts: Sequence[str] | None = None,
                   progress: ProgressOption = None, timeout_s: float | None = None, deadline_s: float | None = None,
                   raise_on_error: bool = True, retry: Retry | None = None,
                   chunk_size: int | None = None) -> ArrayResults:
        """Run ``model`` on every sample of ``inputs`` (input name -> array whose leading axis
        is the sample axis, the same length for every input), or on every text of ``texts``
        (a text model), and return the outputs as arrays with one row per sample: the bulk
        path without a Python object per sample.
        The samples go out as multi-sample entries of ``chunk_size`` (default
        ``settings.chunk_size``), at most ``settings.max_in_flight`` samples outstanding,
        with the backpressure waits and retries of :meth:`map`.

        Args:
            raise_on_error: raise for the first sample that is not ok (default); False
                returns it in ``failures`` (its output rows are zeros, ``ok`` is False).

        Raises:
            ProtocolError: not exactly one of ``inputs`` and ``texts``; inputs without a
                common leading axis (``bad_shape``), a dtype that is not a wire dtype, a text
                that is not a str, or outputs whose row shape differs between entries.
            InferenceFailed, RequestExpired: a sample failed (with ``raise_on_error``).
            UnknownModel, ModelUnavailable, ResultTimeout, QueueFull, BrokerError: as :meth:`map`.
        """
        block, n = one_block(inputs, texts)
        return next(iter(self.imap_arrays(model, [block], progress=progress, timeout_s=timeout_s,
                                          deadline_s=deadline_s, raise_on_error=raise_on_error, total=n,
                                          retry=retry, chunk_size=chunk_size)))

    def _run(self, flow: Flow[T]) -> T:
        return self._io.run(flow)
