"""The asyncio SDK client: the same protocol as :class:`~headrace.client.Client`, with a
reader task instead of a thread.

    async with AsyncClient("redis://127.0.0.1:6379/0") as c:
        res = await c.infer("affine", {"x": np.ones(4, np.float32)})
        ticket = await c.submit("minilm", text="hello")
        res = await ticket            # or await c.result(ticket, timeout_s=5)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import errors as E
from .config import ClientSettings
from .keys import ModelKeys
from .protocol import Result
from .submit import SUBMIT_LUA, parse_reply, prepare_request, resolve_settings, script_args, split_item
from .tickets import Ticket, TicketBook, ordered_results

log = logging.getLogger(__name__)

READ_COUNT = 512


class AsyncClient:
    """asyncio twin of :class:`~headrace.client.Client`; the methods are coroutines.

    Args and raised errors as :class:`~headrace.client.Client`. Use it from one event loop.
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
        self._script = self._redis.register_script(SUBMIT_LUA)
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
        keys = self.model_keys(model)
        prepared = prepare_request(keys, keys.reply(self.client_id), inputs, text, request_id=request_id,
                                   deadline_s=self.settings.deadline_s if deadline_s is None else deadline_s)
        ticket = Ticket(prepared, default_timeout_s=self.settings.timeout_s)
        await self._enqueue(ticket, keys)
        return ticket

    async def resubmit(self, ticket: Ticket) -> Ticket:
        """Enqueue ``ticket``'s request again, same request id; see :meth:`Client.resubmit`.

        Raises:
            QueueFull, BrokerError.
        """
        self._check_open()
        if ticket.done():
            return ticket
        await self._enqueue(ticket, self.model_keys(ticket.model))
        return ticket

    async def _enqueue(self, ticket: Ticket, keys: ModelKeys) -> None:
        prepared = ticket.prepared
        # Register before XADD: the result may arrive before the script call returns.
        new_stream = self._book.add(ticket)
        self._ensure_reader()
        if new_stream:
            await self._wake_reader()
        skeys, argv = script_args(keys, prepared, self.settings.max_backlog)
        try:
            reply = await self._script(keys=skeys, args=argv)
            ticket.entry_id = parse_reply(reply, prepared, self.settings.max_backlog)
        except E.QueueFull:
            self._book.discard(ticket)
            raise
        except redis.RedisError as e:
            self._book.discard(ticket)
            raise E.BrokerError(
                f"submitting request {prepared.request_id} to {keys.requests} failed: {e}; it may or may not "
                "have been enqueued, retry with the same request_id") from e
        ticket.submitted = time.monotonic()
        log.debug("submitted request %s to %s as %s", prepared.request_id, keys.requests, ticket.entry_id)

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
        futures = [asyncio.wrap_future(t._future) for t in tickets]
        if futures:
            # Never cancel these wrappers: cancelling a wrap_future() wrapper cancels the
            # ticket's own future, and a timed-out ticket must stay collectable.
            _done, not_done = await asyncio.wait(futures, timeout=wait)
            if not_done:
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
        pending = {asyncio.wrap_future(t._future) for t in tickets}
        give_up = time.monotonic() + wait
        # The wrappers are left alone on timeout (cancelling one would cancel its ticket).
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, give_up - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise E.ResultTimeout(f"{len(pending)} results did not arrive within {wait:.3f}s")
            for f in done:
                yield f.result()

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

        window: collections.deque[Ticket] = collections.deque()
        with tqdm(total=total, disable=not progress, unit="req", desc=model) as bar:

            async def pop() -> Result:
                res = await window.popleft().wait(wait)
                bar.update(1)
                return res.raise_for_status() if raise_on_error else res

            for item in items:
                inputs, text = split_item(item)
                while len(window) >= self.settings.max_in_flight:
                    yield await pop()
                backoff_s, give_up = 0.01, time.monotonic() + wait
                while True:
                    try:
                        window.append(await self.submit(model, inputs, text, deadline_s=deadline_s))
                        break
                    except E.QueueFull:
                        # Backpressure: see Client.imap.
                        if time.monotonic() > give_up:
                            raise
                        if window:
                            yield await pop()
                        else:
                            await asyncio.sleep(backoff_s)
                            backoff_s = min(backoff_s * 2, 1.0)
            while window:
                yield await pop()

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
            for stream_raw, entries in reply or []:
                stream = stream_raw.decode() if isinstance(stream_raw, bytes) else str(stream_raw)
                ids = self._book.deliver(stream, entries)
                if ids:
                    self._to_delete.setdefault(stream, []).extend(ids)
