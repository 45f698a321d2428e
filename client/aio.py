"""The asyncio SDK client: the same protocol as :class:`~headrace.client.Client`, with a
reader task instead of a thread.

    async with AsyncClient("redis://127.0.0.1:6379/0") as c:
        res = await c.infer("affine", {"x": np.ones(4, np.float32)})
        ticket = await c.submit("minilm", text="hello")
        res = await ticket            # or await c.result(ticket, timeout_s=5)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from headrace.client import errors as E
from headrace.client.bulk import MapWindow, Step, settle
from headrace.client.config import ClientSettings
from headrace.client.keys import ModelKeys
from headrace.client.pipeline import AutoPipeline
from headrace.client.protocol import Result
from headrace.client.submit import prepare_request, resolve_settings, submit_command
from headrace.client.tickets import Ticket, TicketBook, ordered_results, resolve_all

log = logging.getLogger(__name__)

READ_COUNT = 512


class AsyncClient:
    """asyncio twin of :class:`~headrace.client.Client`; the methods are coroutines.

    Args and raised errors as :class:`~headrace.client.Client`. Use it from one event loop.

    Submits are auto-pipelined: the ``submit``/``infer`` calls that coroutines make during
    one pass of the event loop go to Redis together, one ``FCALL`` each in one pipeline
    (see :mod:`headrace.client.pipeline`), and each caller still gets its own outcome
    (ticket, :class:`QueueFull`, :class:`BrokerError`). ``map``/``imap`` submit in batches.
    """

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None,
                 settings: ClientSettings | None = None, client_id: str | None = None, **overrides: Any) -> None:
        self.settings, self.client_id = resolve_settings(settings, client_id, redis_url=redis_url,
                                                         namespace=namespace, **overrides)
        url = self.settings.effective_redis_url
        # A blocking pool: with more concurrent commands than connections (map/bench with
        # hundreds in flight) callers wait for a free connection instead of failing with
        # "Too many connections".
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=self.settings.timeout_s))
        # One dedicated connection for the reader (see Client: CLIENT UNBLOCK needs its id).
        self._reader_redis: aioredis.Redis = aioredis.Redis.from_url(
            url, single_connection_client=True, retry=Retry(NoBackoff(), 0),
            socket_timeout=self.settings.reply_block_ms / 1000 + 10)
        self._pipeline = AutoPipeline(self._redis)
        self._book = TicketBook()
        self._keys: dict[str, ModelKeys] = {}
        self._closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._reader_conn_id: int | None = None
        self._to_delete: dict[str, list[str]] = {}
        self.reconnects = 0

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader task and close connections (see :meth:`Client.close`)."""
        if self._closed.is_set():
            return
        self._closed.set()
        await self._pipeline.aclose()  # submits already queued get their answers first
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already logged by the loop
                pass
        try:
            if not self._book.outstanding():
                streams = list(self._book.cursors())
                if streams:
                    await self._redis.delete(*streams)
        except redis.RedisError as e:
            log.debug("could not delete reply streams on close: %s", e)
        await self._reader_redis.aclose()
        await self._redis.aclose()

    async def ping(self) -> bool:
        """True when Redis answers.

        Raises:
            BrokerError: Redis is unreachable.
        """
        try:
            return bool(await self._redis.ping())
        except redis.RedisError as e:
            raise E.BrokerError(f"Redis is unreachable: {e}") from e

    def model_keys(self, model: str) -> ModelKeys:
        """Key names of ``model`` in this client's namespace."""
        keys = self._keys.get(model)
        if keys is None:
            keys = self._keys[model] = ModelKeys(namespace=self.settings.namespace, model=model)
        return keys

    def reply_stream(self, model: str) -> str:
        return self.model_keys(model).reply(self.client_id)

    async def submit(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
                     request_id: str | None = None, deadline_s: float | None = None) -> Ticket:
        """Enqueue one request; see :meth:`Client.submit`.

        Raises:
            QueueFull, ProtocolError, BrokerError.
        """
        self._check_open()
        ticket = self._new_ticket(model, inputs, text, request_id, deadline_s)
        await self._enqueue(ticket)
        return ticket

    def _new_ticket(self, model: str, inputs: Mapping[str, Any] | None, text: str | None,
                    request_id: str | None, deadline_s: float | None) -> Ticket:
        keys = self.model_keys(model)
        prepared = prepare_request(keys, keys.reply(self.client_id), inputs, text, request_id=request_id,
                                   deadline_s=self.settings.deadline_s if deadline_s is None else deadline_s)
        return Ticket(prepared, default_timeout_s=self.settings.timeout_s)

    async def resubmit(self, ticket: Ticket) -> Ticket:
        """Enqueue ``ticket``'s request again, same request id; see :meth:`Client.resubmit`.

        Raises:
            QueueFull, BrokerError.
        """
        self._check_open()
        if ticket.done():
            return ticket
        await self._enqueue(ticket)
        return ticket

    async def _enqueue(self, ticket: Ticket) -> None:
        """Submit ``ticket`` through the auto-pipeline.

        Raises:
            QueueFull, BrokerError: as :meth:`submit` (the ticket is no longer tracked).
        """
        err = (await self._submit_tickets([ticket]))[0]
        if err is not None:
            raise err

    async def _submit_tickets(self, tickets: Sequence[Ticket]) -> list[E.HeadraceError | None]:
        """Submit ``tickets`` together (one pipeline); per ticket the error that refused it,
        None when enqueued. Refused tickets are no longer tracked."""
        if not tickets:
            return []
        # Register before submitting: the result may arrive before the function's reply does.
        new_stream = self._book.add_all(tickets)
        self._ensure_reader()
        if new_stream:
            await self._wake_reader()
        max_backlog = self.settings.max_backlog
        futures = [self._pipeline.submit(submit_command(self.model_keys(t.model), t.prepared, max_backlog))
                   for t in tickets]
        errors: list[E.HeadraceError | None] = []
        try:
            for t, fut in zip(tickets, futures, strict=True):
                try:
                    reply = await fut
                except redis.RedisError as e:
                    reply = e
                err = settle(t, self.model_keys(t.model), reply, max_backlog)
                if err is not None:
                    self._book.discard(t)
                errors.append(err)
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()  # not sent yet: left out of the pipeline
            raise
        return errors

    def forget(self, ticket: Ticket) -> None:
        """Stop tracking ``ticket``: its result, should it still come, is dropped (and
        deleted from the reply stream), and the ticket's request is no longer held in
        memory by this client. For callers that give up on a request for good."""
        self._book.discard(ticket)

    async def result(self, ticket: Ticket, timeout_s: float | None = None) -> Result:
        """Wait for ``ticket``'s result.

        Raises:
            ResultTimeout: no result within ``timeout_s`` (default ``settings.timeout_s``).
        """
        return await ticket.wait(timeout_s)

    async def infer(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
                    request_id: str | None = None, deadline_s: float | None = None,
                    timeout_s: float | None = None, raise_on_error: bool = True) -> Result:
        """Submit and wait; see :meth:`Client.infer`.

        Raises:
            QueueFull, ProtocolError, BrokerError, ResultTimeout, InferenceFailed, RequestExpired.
        """
        ticket = await self.submit(model, inputs, text, request_id=request_id, deadline_s=deadline_s)
        res = await ticket.wait(timeout_s)
        return res.raise_for_status() if raise_on_error else res

    async def collect(self, tickets: Sequence[Ticket], timeout_s: float | None = None, *,
                      raise_on_error: bool = False) -> list[Result]:
        """Wait for all ``tickets``; results in the given order; see :meth:`Client.collect`.

        Raises:
            ResultTimeout, InferenceFailed, RequestExpired.
        """
        wait = self.settings.timeout_s if timeout_s is None else timeout_s
        # Private waiters (see Ticket._async_waiter): dropping them on a timeout leaves the
        # tickets collectable.
        waiters = {t._async_waiter(): t for t in tickets if not t.done()}
        if waiters:
            _done, not_done = await asyncio.wait(waiters, timeout=wait)
            if not_done:
                for w in not_done:
                    waiters[w]._forget(w)
                    w.cancel()
                raise E.ResultTimeout(f"{len(not_done)} of {len(tickets)} results did not arrive within "
                                      f"{wait:.3f}s; the tickets stay collectable")
        results = ordered_results(tickets)
        if raise_on_error:
            for r in results:
                r.raise_for_status()
        return results

    async def results(self, tickets: Iterable[Ticket], timeout_s: float | None = None) -> AsyncIterator[Result]:
        """Yield results as they arrive (completion order).

        Raises:
            ResultTimeout: the rest did not arrive within ``timeout_s`` in total.
        """
        wait = self.settings.timeout_s if timeout_s is None else timeout_s
        waiters = {t._async_waiter(): t for t in tickets}
        pending = set(waiters)
        give_up = time.monotonic() + wait
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=max(0.0, give_up - time.monotonic()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise E.ResultTimeout(f"{len(pending)} results did not arrive within {wait:.3f}s")
                for w in done:
                    result = w.result()
                    assert result is not None  # waiters complete with None only in Ticket.wait
                    yield result
        finally:
            # Given up (timeout, or the caller stopped iterating): drop the private waiters;
            # the tickets stay collectable.
            for w in pending:
                waiters[w]._forget(w)
                w.cancel()

    def outstanding(self) -> list[Ticket]:
        """Tickets not answered yet (for ``resubmit``)."""
        return self._book.outstanding()

    async def imap(self, model: str, items: Iterable[Any], *, progress: bool = True,
                   timeout_s: float | None = None, deadline_s: float | None = None,
                   raise_on_error: bool = False, total: int | None = None) -> AsyncIterator[Result]:
        """Async generator form of :meth:`map` (input order)."""
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
                    window.sent(await self._submit_tickets(window.to_send()))
                elif step is Step.POP:
                    res = await window.oldest().wait(wait)
                    window.popleft()
                    yield out(res)
                    # The results right behind it are often in already (a worker answers a
                    # batch at once): take them too, so the next send is one batch as well.
                    while window.oldest_done():
                        yield out(await window.popleft().wait(0))
                    window.popped()
                elif step is Step.BACK_OFF:
                    # Backpressure with nothing of ours out: wait, then try again.
                    await asyncio.sleep(window.back_off_s())
                else:
                    return

    async def map(self, model: str, items: Iterable[Any], *, progress: bool = True,
                  timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
                  total: int | None = None) -> list[Result]:
        """Pipelined bulk inference, results in input order; see :meth:`Client.map`.

        Raises:
            ProtocolError, ResultTimeout, QueueFull, BrokerError, InferenceFailed, RequestExpired.
        """
        return [r async for r in self.imap(model, items, progress=progress, timeout_s=timeout_s,
                                           deadline_s=deadline_s, raise_on_error=raise_on_error, total=total)]

    # --- the reader task -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise E.HeadraceError("this AsyncClient is closed; create a new one")

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(),
                                                                  name=f"headrace-reader-{self.client_id}")

    async def _wake_reader(self) -> None:
        """Best-effort CLIENT UNBLOCK of the reader's XREAD (see :meth:`Client._wake_reader`)."""
        conn_id = self._reader_conn_id
        if conn_id is None:
            return
        try:
            await self._redis.client_unblock(conn_id)
        except redis.RedisError as e:
            log.debug("CLIENT UNBLOCK failed: %s", e)

    async def _read_loop(self) -> None:
        backoff_s = 0.05
        r = self._reader_redis
        while not self._closed.is_set():
            try:
                if self._reader_conn_id is None:
                    self._reader_conn_id = int(await r.client_id())
                if self._to_delete:
                    pipe = r.pipeline(transaction=False)
                    for stream, ids in self._to_delete.items():
                        pipe.xdel(stream, *ids)
                    await pipe.execute()
                    self._to_delete.clear()
                streams: dict[Any, Any] = dict(self._book.cursors())
                reply: Any = await r.xread(streams, count=READ_COUNT, block=self.settings.reply_block_ms)
            except redis.RedisError as e:
                if self._closed.is_set():
                    break
                self._reader_conn_id = None
                self.reconnects += 1
                log.warning("reply reader for client %s lost Redis (%s); retrying in %.2fs",
                            self.client_id, e, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.reconnect_backoff_max_s)
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reader must survive anything; it is logged
                log.exception("reply reader for client %s failed; retrying", self.client_id)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.reconnect_backoff_max_s)
                continue
            backoff_s = 0.05
            answered: list[tuple[Ticket, Result]] = []
            for stream_raw, entries in reply or []:
                stream = stream_raw.decode() if isinstance(stream_raw, bytes) else str(stream_raw)
                ids, got = self._book.take(stream, entries)
                answered += got
                if ids:
                    self._to_delete.setdefault(stream, []).extend(ids)
            if answered:
                # Resolve in the next pass of the loop, not right here: this task first goes
                # on to write the XDEL of these entries, so a caller that wakes up with its
                # result finds them deleted (or on their way), as it did before.
                asyncio.get_running_loop().call_soon(resolve_all, answered)
