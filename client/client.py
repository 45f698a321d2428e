"""The thread-based SDK client: submit requests, collect results from one reply stream per
model, read by a background thread with blocking ``XREAD``.

    from headrace.client import Client
    with Client("redis://127.0.0.1:6379/0") as c:
        emb = c.infer("minilm", text="A sentence.").outputs["embeddings"]
        results = c.map("affine", ({"x": v} for v in vectors))      # input order, tqdm bar
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from headrace.client import errors as E
from headrace.client.bulk import MapWindow, Step, settle
from headrace.client.config import ClientSettings
from headrace.client.keys import ModelKeys
from headrace.client.pipeline import run_submits
from headrace.client.protocol import Result
from headrace.client.submit import prepare_request, resolve_settings, submit_command
from headrace.client.tickets import Ticket, TicketBook, ordered_results

log = logging.getLogger(__name__)

# Entries one XREAD returns at most per stream.
READ_COUNT = 512


class Client:
    """Submit inference requests and collect their results (thread-safe).

    Args:
        redis_url: ``redis://`` / ``rediss://`` URL (ACL user and password included), passed
            straight to ``redis.Redis.from_url``; None uses ``HEADRACE_REDIS_URL``.
        namespace: key namespace shared with the workers; None uses ``HEADRACE_NAMESPACE``.
        settings: full :class:`ClientSettings`; None builds them from the environment.
        client_id: names this client's reply streams; None picks a unique one. Reuse an id
            only to pick up results of a previous client that is gone.
        **overrides: any other :class:`ClientSettings` field (``max_backlog``, ``timeout_s``...).

    Raises:
        ConfigError: an invalid setting.
    """

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None,
                 settings: ClientSettings | None = None, client_id: str | None = None, **overrides: Any) -> None:
        self.settings, self.client_id = resolve_settings(settings, client_id, redis_url=redis_url,
                                                         namespace=namespace, **overrides)
        url = self.settings.effective_redis_url
        self._redis: redis.Redis = redis.Redis.from_url(url)
        self._reader_redis: redis.Redis | None = None  # created by the reader thread
        self._book = TicketBook()
        self._keys: dict[str, ModelKeys] = {}
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None
        self._reader_lock = threading.Lock()
        self._reader_conn_id: int | None = None
        self._to_delete: dict[str, list[str]] = {}
        self.reconnects = 0

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader and close connections. Reply streams with nothing outstanding
        are deleted; others expire by their TTL (``reply_ttl_s``)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake_reader()
        if self._reader is not None:
            self._reader.join(self.settings.reply_block_ms / 1000 + 5)
        try:
            if not self._book.outstanding():
                streams = list(self._book.cursors())
                if streams:
                    self._redis.delete(*streams)
        except redis.RedisError as e:
            log.debug("could not delete reply streams on close: %s", e)
        if self._reader_redis is not None:
            self._reader_redis.close()
        self._redis.close()

    def ping(self) -> bool:
        """True when Redis answers.

        Raises:
            BrokerError: Redis is unreachable.
        """
        try:
            return bool(self._redis.ping())
        except redis.RedisError as e:
            raise E.BrokerError(f"Redis at {self._safe_url()} is unreachable: {e}") from e

    # --- submitting ----------------------------------------------------------------------

    def model_keys(self, model: str) -> ModelKeys:
        """Key names of ``model`` in this client's namespace.

        Raises:
            ConfigError: an invalid model name.
        """
        keys = self._keys.get(model)
        if keys is None:
            keys = self._keys[model] = ModelKeys(namespace=self.settings.namespace, model=model)
        return keys

    def reply_stream(self, model: str) -> str:
        """The reply stream this client reads for ``model``."""
        return self.model_keys(model).reply(self.client_id)

    def submit(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
               request_id: str | None = None, deadline_s: float | None = None) -> Ticket:
        """Enqueue one request; return its :class:`Ticket` at once.

        Args:
            model: served model name.
            inputs: named arrays, one sample each (no batch dimension).
            text: a text input instead of ``inputs``.
            request_id: your id (idempotency key); None picks a unique one.
            deadline_s: answer ``expired`` instead of running after this many seconds;
                None uses ``settings.deadline_s`` (0 = no deadline).

        Raises:
            QueueFull: the model's backlog reached ``max_backlog``; nothing was enqueued.
            ProtocolError: invalid inputs or request id.
            BrokerError: Redis failed (the request may or may not have been enqueued;
                retry with the same ``request_id`` to stay effectively-once).
        """
        self._check_open()
        ticket = self._new_ticket(model, inputs, text, request_id, deadline_s)
        err = self._submit_tickets([ticket])[0]
        if err is not None:
            raise err
        return ticket

    def _new_ticket(self, model: str, inputs: Mapping[str, Any] | None, text: str | None,
                    request_id: str | None, deadline_s: float | None) -> Ticket:
        keys = self.model_keys(model)
        prepared = prepare_request(keys, keys.reply(self.client_id), inputs, text, request_id=request_id,
                                   deadline_s=self.settings.deadline_s if deadline_s is None else deadline_s)
        return Ticket(prepared, default_timeout_s=self.settings.timeout_s)

    def resubmit(self, ticket: Ticket) -> Ticket:
        """Enqueue ``ticket``'s request again with the same request id (after Redis lost
        data, e.g. a restart without persistence). Safe when the first one still runs:
        the workers' dedupe answers a request id once. A done ticket is returned as is.

        Raises:
            QueueFull, BrokerError: as :meth:`submit`.
        """
        self._check_open()
        if ticket.done():
            return ticket
        err = self._submit_tickets([ticket])[0]
        if err is not None:
            raise err
        return ticket

    def _submit_tickets(self, tickets: Sequence[Ticket]) -> list[E.HeadraceError | None]:
        """Submit ``tickets`` in one pipeline (one round trip); per ticket the error that
        refused it (QueueFull, BrokerError), None when enqueued. Refused tickets are no
        longer tracked."""
        if not tickets:
            return []
        # Register before submitting: the result may arrive before the function's reply does.
        new_stream = self._book.add_all(tickets)
        self._ensure_reader()
        if new_stream:
            self._wake_reader()
        max_backlog = self.settings.max_backlog
        commands = [submit_command(self.model_keys(t.model), t.prepared, max_backlog) for t in tickets]
        try:
            replies = run_submits(self._redis, commands)
        except redis.RedisError as e:
            replies = [e] * len(tickets)
        errors: list[E.HeadraceError | None] = []
        for t, reply in zip(tickets, replies, strict=True):
            err = settle(t, self.model_keys(t.model), reply, max_backlog)
            if err is not None:
                self._book.discard(t)
            errors.append(err)
        return errors

    # --- collecting ----------------------------------------------------------------------

    def result(self, ticket: Ticket, timeout_s: float | None = None) -> Result:
        """Wait for ``ticket``'s result. See :meth:`Ticket.result`.

        Raises:
            ResultTimeout: no result within ``timeout_s`` (default ``settings.timeout_s``).
        """
        return ticket.result(timeout_s)

    def infer(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
              request_id: str | None = None, deadline_s: float | None = None, timeout_s: float | None = None,
              raise_on_error: bool = True) -> Result:
        """Submit one request and wait for its result.

        Args:
            raise_on_error: raise for ``error``/``rejected``/``expired`` results instead of
                returning them.

        Raises:
            QueueFull, ProtocolError, BrokerError: as :meth:`submit`.
            ResultTimeout: no result within ``timeout_s`` (default ``settings.timeout_s``).
            InferenceFailed: the result is an error and ``raise_on_error`` (``.code`` says why).
            RequestExpired: the deadline passed before it ran and ``raise_on_error``.
        """
        res = self.submit(model, inputs, text, request_id=request_id, deadline_s=deadline_s).result(timeout_s)
        return res.raise_for_status() if raise_on_error else res

    def collect(self, tickets: Sequence[Ticket], timeout_s: float | None = None, *,
                raise_on_error: bool = False) -> list[Result]:
        """Wait for all ``tickets``; return their results in the given order.

        Args:
            timeout_s: longest wait for all of them together (default ``settings.timeout_s``).

        Raises:
            ResultTimeout: not all results arrived in time (the tickets stay collectable).
            InferenceFailed, RequestExpired: with ``raise_on_error``, for the first failed one.
        """
        wait = self.settings.timeout_s if timeout_s is None else timeout_s
        done, not_done = concurrent.futures.wait([t._future for t in tickets], timeout=wait)
        if not_done:
            raise E.ResultTimeout(f"{len(not_done)} of {len(tickets)} results did not arrive within {wait:.3f}s; "
                                  "the tickets stay collectable")
        results = ordered_results(tickets)
        if raise_on_error:
            for r in results:
                r.raise_for_status()
        return results

    def results(self, tickets: Iterable[Ticket], timeout_s: float | None = None) -> Iterator[Result]:
        """Yield results as they arrive (completion order).

        Raises:
            ResultTimeout: the rest did not arrive within ``timeout_s`` in total.
        """
        wait = self.settings.timeout_s if timeout_s is None else timeout_s
        futures = [t._future for t in tickets]
        try:
            for fut in concurrent.futures.as_completed(futures, timeout=wait):
                yield fut.result()
        except concurrent.futures.TimeoutError as e:
            missing = sum(1 for f in futures if not f.done())
            raise E.ResultTimeout(f"{missing} results did not arrive within {wait:.3f}s") from e

    def outstanding(self) -> list[Ticket]:
        """Tickets submitted by this client and not answered yet (for ``resubmit``)."""
        return self._book.outstanding()

    # --- bulk ----------------------------------------------------------------------------

    def imap(self, model: str, items: Iterable[Any], *, progress: bool = True, timeout_s: float | None = None,
             deadline_s: float | None = None, raise_on_error: bool = False,
             total: int | None = None) -> Iterator[Result]:
        """Like :meth:`map` but yields each result (in input order) as soon as it and all
        earlier ones are in."""
        wait = self.settings.timeout_s if timeout_s is None else timeout_s
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        from tqdm.auto import tqdm

        def prepare(inputs: Mapping[str, Any] | None, text: str | None, request_id: str | None) -> Ticket:
            return self._new_ticket(model, inputs, text, request_id, deadline_s)

        window = MapWindow(items, self.settings.max_in_flight, wait, prepare)
        with tqdm(total=total, disable=not progress, unit="req", desc=model) as bar:

            def out(res: Result) -> Result:
                bar.update(1)
                return res.raise_for_status() if raise_on_error else res

            while True:
                step = window.step()
                if step is Step.SEND:
                    self._check_open()
                    window.sent(self._submit_tickets(window.to_send()))
                elif step is Step.POP:
                    res = window.oldest().result(wait)
                    window.popleft()
                    yield out(res)
                    # The results right behind it are often in already (a worker answers a
                    # batch at once): take them too, so the next send is one batch as well.
                    while window.oldest_done():
                        yield out(window.popleft().result(0))
                    window.popped()
                elif step is Step.BACK_OFF:
                    # Backpressure with nothing of ours out: wait, then try again.
                    self._closed.wait(window.back_off_s())
                else:
                    return

    def map(self, model: str, items: Iterable[Any], *, progress: bool = True, timeout_s: float | None = None,
            deadline_s: float | None = None, raise_on_error: bool = False, total: int | None = None) -> list[Result]:
        """Run ``model`` on every item with at most ``settings.max_in_flight`` requests
        outstanding; return the results in input order. While the queue is full
        (:class:`QueueFull`) it waits and retries instead of failing. Requests are
        submitted in batches, one Redis round trip for all there is room for.

        Args:
            items: ``str`` items are text inputs, mappings are named input arrays.
            progress: show a tqdm progress bar.
            timeout_s: longest wait for any one result, and for the queue to take a request.
            raise_on_error: raise on the first non-ok result instead of returning it.
            total: length for the progress bar when ``items`` has no ``len``.

        Raises:
            ProtocolError: an item is neither ``str`` nor a mapping, or is invalid.
            ResultTimeout: a result did not arrive within ``timeout_s``.
            QueueFull: the queue refused requests for longer than ``timeout_s``.
            BrokerError: Redis failed.
            InferenceFailed, RequestExpired: with ``raise_on_error``.
        """
        return list(self.imap(model, items, progress=progress, timeout_s=timeout_s, deadline_s=deadline_s,
                              raise_on_error=raise_on_error, total=total))

    # --- the reader ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise E.HeadraceError("this Client is closed; create a new one")

    def _safe_url(self) -> str:
        kw = self._redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        with self._reader_lock:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read_loop, name=f"headrace-reader-{self.client_id}",
                                                daemon=True)
                self._reader.start()

    def _wake_reader(self) -> None:
        """Interrupt the reader's blocking XREAD so it re-reads its stream list at once.
        Best effort: without it (e.g. an ACL without CLIENT), new streams join the read
        after at most ``reply_block_ms``."""
        conn_id = self._reader_conn_id
        if conn_id is None:
            return
        try:
            self._redis.client_unblock(conn_id)
        except redis.RedisError as e:
            log.debug("CLIENT UNBLOCK failed (%s); the reader picks up new streams within %d ms",
                      e, self.settings.reply_block_ms)

    def _reader_client(self) -> redis.Redis:
        """The reader's own single connection (connects at once, so it is made here, in the
        reader's retry loop). Its CLIENT ID lets submitters wake a blocked XREAD (CLIENT
        UNBLOCK) when a new reply stream must join it. redis-py's retries are off: the
        loop has its own backoff and logging."""
        if self._reader_redis is None:
            self._reader_redis = redis.Redis.from_url(
                self.settings.effective_redis_url, single_connection_client=True, retry=Retry(NoBackoff(), 0),
                socket_timeout=self.settings.reply_block_ms / 1000 + 10)
        return self._reader_redis

    def _read_loop(self) -> None:
        backoff_s = 0.05
        while not self._closed.is_set():
            try:
                r = self._reader_client()
                if self._reader_conn_id is None:
                    self._reader_conn_id = int(r.client_id())
                self._flush_deletes(r)
                if self._closed.is_set():
                    break
                streams: dict[Any, Any] = dict(self._book.cursors())
                reply: Any = r.xread(streams, count=READ_COUNT, block=self.settings.reply_block_ms)
            except redis.RedisError as e:
                if self._closed.is_set():
                    break
                self._reader_conn_id = None
                self.reconnects += 1
                log.warning("reply reader for client %s lost Redis (%s); retrying in %.2fs",
                            self.client_id, e, backoff_s)
                self._closed.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.reconnect_backoff_max_s)
                continue
            except Exception:  # noqa: BLE001 - the reader must survive anything; it is logged
                log.exception("reply reader for client %s failed; retrying", self.client_id)
                self._closed.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.reconnect_backoff_max_s)
                continue
            backoff_s = 0.05
            for stream_raw, entries in reply or []:
                stream = stream_raw.decode() if isinstance(stream_raw, bytes) else str(stream_raw)
                ids = self._book.deliver(stream, entries)
                if ids:
                    self._to_delete.setdefault(stream, []).extend(ids)

    def _flush_deletes(self, r: redis.Redis) -> None:
        """Delete consumed reply entries (this client is the only reader of its streams).
        Kept for the next round when Redis fails, so nothing is re-read or leaked."""
        if not self._to_delete:
            return
        pipe = r.pipeline(transaction=False)
        for stream, ids in self._to_delete.items():
            pipe.xdel(stream, *ids)
        pipe.execute()
        self._to_delete.clear()
