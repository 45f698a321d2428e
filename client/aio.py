"""The asyncio SDK client: the same protocol as :class:`~headrace.client.Client` (the same
flows, :mod:`headrace.client.flows`), with a reader task instead of a thread.

    async with AsyncClient("redis://127.0.0.1:6379/0") as c:
        res = await c.infer("affine", {"x": np.ones(4, np.float32)})
        ticket = await c.submit("minilm", text="hello")
        res = await ticket            # or await c.result(ticket, timeout_s=5)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence, Sized
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import NoBackoff

from headrace.client import flows
from headrace.client.bulk import MapItem
from headrace.client.config import ClientSettings
from headrace.client.core import ClientCore, connection_backoff, connection_options
from headrace.client.effects import (
    Delete,
    Effect,
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
    adrive,
    aiterate,
)
from headrace.client.failures import broker_error
from headrace.client.health import ModelDescription, ModelStatus
from headrace.client.keys import ModelKeys
from headrace.client.pipeline import AutoPipeline, Command
from headrace.client.progress import ProgressOption, make_progress
from headrace.client.protocol import Result
from headrace.client.registry import aread_model
from headrace.client.retry import Retry
from headrace.client.submit import resolve_settings
from headrace.client.tickets import Ticket, resolve_all

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncClient:
    """asyncio twin of :class:`~headrace.client.Client`; the methods are coroutines.

    Args and raised errors as :class:`~headrace.client.Client`. Use it from one event loop
    (``ticket.cancel()`` may be called from any thread).

    Submits are auto-pipelined: the ``submit``/``infer`` calls that coroutines make during
    one pass of the event loop go to Redis together, one ``EVALSHA`` each in one pipeline
    (see :mod:`headrace.client.pipeline`), and each caller still gets its own outcome
    (ticket, :class:`QueueFull`, :class:`BrokerError`). ``map``/``imap`` submit in batches.
    A cancelled ``infer`` task cancels its request (workers skip it if not started).
    """

    def __init__(self, redis_url: str | None = None, *, namespace: str | None = None,
                 settings: ClientSettings | None = None, client_id: str | None = None, retry: Retry | None = None,
                 **overrides: Any) -> None:
        self.settings, self.client_id = resolve_settings(settings, client_id, redis_url=redis_url,
                                                         namespace=namespace, **overrides)
        s = self.settings
        url = s.effective_redis_url
        self._core = ClientCore(s, self.client_id, retry)
        self._core.cancel_sink = self._send_cancel
        # A blocking pool: with more concurrent commands than connections (map/bench with
        # hundreds in flight) callers wait for a free connection instead of failing with
        # "Too many connections". Its connections retry after a Redis restart (redis.asyncio
        # does not by default: the first command on each would fail).
        self._redis: aioredis.Redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=s.timeout_s,
            retry=AsyncRedisRetry(connection_backoff(s), s.connect_retries), **connection_options(s)))
        # One dedicated connection for the reader (see Client: CLIENT UNBLOCK needs its id).
        self._reader_redis: aioredis.Redis = aioredis.Redis.from_url(
            url, single_connection_client=True, retry=AsyncRedisRetry(NoBackoff(), 0),
            socket_timeout=s.reply_block_ms / 1000 + 10)
        self._pipeline = AutoPipeline(self._redis)
        self._closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry_reads: dict[str, asyncio.Future[Any]] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader task and close connections (see :meth:`Client.close`)."""
        if self._closed.is_set():
            return
        self._core.closed = True
        self._closed.set()
        await self._pipeline.aclose()  # submits (and cancel markers) already queued go out first
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already logged by the loop
                pass
        try:
            streams = self._core.streams_to_drop()
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
            raise broker_error(e, "PING of Redis") from e

    @property
    def retry(self) -> Retry:
        """The default retry policy of this client's calls."""
        return self._core.retry

    @property
    def reconnects(self) -> int:
        """How often the reply reader lost Redis and reconnected."""
        return self._core.reconnects

    @property
    def _reader_conn_id(self) -> int | None:
        return self._core.reader_conn_id

    def model_keys(self, model: str) -> ModelKeys:
        """Key names of ``model`` in this client's namespace."""
        return self._core.model_keys(model)

    def reply_stream(self, model: str) -> str:
        return self._core.reply_stream(model)

    async def model_status(self, model: str) -> ModelStatus:
        """See :meth:`Client.model_status`. Raises: ConfigError, BrokerError."""
        return await self._run(flows.model_status(self._core, model))

    async def describe(self, model: str) -> ModelDescription:
        """See :meth:`Client.describe`. Raises: UnknownModel, BrokerError."""
        return await self._run(flows.describe(self._core, model))

    async def submit(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
                     request_id: str | None = None, deadline_s: float | None = None,
                     retry: Retry | None = None) -> Ticket:
        """Enqueue one request; see :meth:`Client.submit`.

        Raises:
            UnknownModel, ModelUnavailable, QueueFull, ProtocolError, BrokerError.
        """
        self._core.check_open("AsyncClient")
        ticket = self._core.new_ticket(model, inputs, text, request_id, deadline_s)
        policy = retry if retry is not None else self._core.retry
        await self._run(flows.submit(self._core, ticket, policy.start(ticket.deadline_ms)))
        return ticket

    async def resubmit(self, ticket: Ticket) -> Ticket:
        """Enqueue ``ticket``'s request again, same request id; see :meth:`Client.resubmit`.

        Raises:
            QueueFull, BrokerError.
        """
        self._core.check_open("AsyncClient")
        if not ticket.done():
            attempts = self._core.retry.start(ticket.deadline_ms)
            await self._run(flows.submit(self._core, ticket, attempts, check=False, resubmit=True))
        return ticket

    def forget(self, ticket: Ticket) -> bool:
        """Stop tracking ``ticket``; see :meth:`Client.forget`."""
        return self._core.forget(ticket)

    async def result(self, ticket: Ticket, timeout_s: float | None = None) -> Result:
        """Wait for ``ticket``'s result.

        Raises:
            ResultTimeout: no result within ``timeout_s`` (default ``settings.timeout_s``).
            RequestCancelled: the ticket was cancelled or forgotten.
        """
        return await ticket.wait(timeout_s)

    async def infer(self, model: str, inputs: Mapping[str, Any] | None = None, text: str | None = None, *,
                    request_id: str | None = None, deadline_s: float | None = None,
                    timeout_s: float | None = None, raise_on_error: bool = True, retry: Retry | None = None) -> Result:
        """Submit and wait; see :meth:`Client.infer`. Cancelling the calling task cancels
        the request.

        Raises:
            UnknownModel, ModelUnavailable, QueueFull, ProtocolError, BrokerError, ResultTimeout,
            InferenceFailed, RequestExpired.
        """
        self._core.check_open("AsyncClient")
        ticket = self._core.new_ticket(model, inputs, text, request_id, deadline_s)
        res = await self._run(flows.infer(self._core, ticket, timeout_s, retry))
        return res.raise_for_status() if raise_on_error else res

    async def collect(self, tickets: Sequence[Ticket], timeout_s: float | None = None, *,
                      raise_on_error: bool = False) -> list[Result]:
        """Wait for all ``tickets``; results in the given order; see :meth:`Client.collect`.

        Raises:
            ResultTimeout, RequestCancelled, InferenceFailed, RequestExpired.
        """
        results = await self._run(flows.collect(self._core, tickets, timeout_s))
        if raise_on_error:
            for r in results:
                r.raise_for_status()
        return results

    def results(self, tickets: Iterable[Ticket], timeout_s: float | None = None) -> AsyncIterator[Result]:
        """Yield results as they arrive (completion order); ``async for``.

        Raises:
            ResultTimeout: the rest did not arrive within ``timeout_s`` in total.
        """
        return aiterate(flows.results(self._core, tickets, timeout_s), self._perform)

    def outstanding(self) -> list[Ticket]:
        """Tickets not answered, cancelled or forgotten yet."""
        return self._core.book.outstanding()

    def imap(self, model: str, items: Iterable[MapItem], *, progress: ProgressOption = None,
             timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
             total: int | None = None, retry: Retry | None = None) -> AsyncIterator[Result]:
        """Async iterator form of :meth:`map` (input order); ``async for``."""
        if total is None and isinstance(items, Sized):
            total = len(items)
        bar = make_progress(progress, total, model)
        return aiterate(flows.imap(self._core, model, items, timeout_s=timeout_s, deadline_s=deadline_s, retry=retry,
                                   progress=bar, raise_on_error=raise_on_error), self._perform)

    async def map(self, model: str, items: Iterable[MapItem], *, progress: ProgressOption = None,
                  timeout_s: float | None = None, deadline_s: float | None = None, raise_on_error: bool = False,
                  total: int | None = None, retry: Retry | None = None) -> list[Result]:
        """Pipelined bulk inference, results in input order; see :meth:`Client.map`.

        Raises:
            UnknownModel, ModelUnavailable, ProtocolError, ResultTimeout, QueueFull, BrokerError,
            InferenceFailed, RequestExpired.
        """
        return [r async for r in self.imap(model, items, progress=progress, timeout_s=timeout_s,
                                           deadline_s=deadline_s, raise_on_error=raise_on_error, total=total,
                                           retry=retry)]

    # --- performing effects ----------------------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        self._loop = self._loop or asyncio.get_running_loop()
        return await adrive(flow, self._perform)

    async def _perform(self, effect: Effect) -> Any:  # noqa: C901 - one branch per effect type
        if isinstance(effect, Send):
            return await self._send(effect.commands)
        if isinstance(effect, Wait):
            return not await self._wait([effect.ticket], effect.timeout_s, asyncio.ALL_COMPLETED)
        if isinstance(effect, WaitAll):
            return len(await self._wait(effect.tickets, effect.timeout_s, asyncio.ALL_COMPLETED))
        if isinstance(effect, WaitAny):
            pending = await self._wait(effect.tickets, effect.timeout_s, asyncio.FIRST_COMPLETED)
            return [t for t in effect.tickets if t not in pending]
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, WakeReader):
            self._ensure_reader()
            await self._wake_reader()
            return None
        if isinstance(effect, ReadModel):
            return await self._read_model(effect)
        if isinstance(effect, ReaderId):
            return int(await self._reader_redis.client_id())
        if isinstance(effect, Delete):
            pipe = self._reader_redis.pipeline(transaction=False)
            for stream, ids in effect.entries.items():
                pipe.xdel(stream, *ids)
            await pipe.execute()
            return None
        if isinstance(effect, XRead):
            streams: dict[Any, Any] = dict(effect.streams)
            return await self._reader_redis.xread(streams, count=effect.count, block=effect.block_ms)
        if isinstance(effect, Resolve):
            # Resolve in the next pass of the loop: the reader task first goes on to write
            # the XDEL of these entries, so a caller that wakes up with its result finds
            # them deleted (or on their way).
            asyncio.get_running_loop().call_soon(resolve_all, effect.answered)
            return None
        raise TypeError(f"unknown effect {effect!r}")

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        futures = [self._pipeline.submit(cmd) for cmd in commands]
        replies: list[Any] = []
        try:
            for fut in futures:
                try:
                    replies.append(await fut)
                except redis.RedisError as e:
                    replies.append(e)
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()  # not sent yet: left out of the pipeline
            raise
        return replies

    async def _wait(self, tickets: Sequence[Ticket], timeout_s: float, when: str) -> set[Ticket]:
        """Wait for ``tickets`` (all, or the first); return the ones not done. The waiters
        are private (see Ticket._async_waiter): dropping them leaves the tickets alone."""
        waiters = {t._async_waiter(): t for t in tickets if not t.done()}
        if not waiters:
            return set()
        try:
            _done, not_done = await asyncio.wait(waiters, timeout=timeout_s, return_when=when)
        finally:
            for w, t in waiters.items():
                if not w.done() or w.cancelled():
                    t._forget(w)
                    w.cancel()
        return {waiters[w] for w in not_done}

    async def _read_model(self, effect: ReadModel) -> Any:
        """One registry read per model at a time: concurrent submit checks share it."""
        if effect.cached_ok:
            cached = self._core.registry.cached(effect.model)
            if cached is not None:
                return cached
            running = self._registry_reads.get(effect.model)
            if running is not None:
                return await asyncio.shield(running)
        task = asyncio.ensure_future(aread_model(self._redis, self.settings.namespace, effect.model))
        self._registry_reads[effect.model] = task
        try:
            return await asyncio.shield(task)
        finally:
            if self._registry_reads.get(effect.model) is task:
                del self._registry_reads[effect.model]

    def _send_cancel(self, command: Command) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._closed.is_set():
            log.debug("client closed: cancel marker %s not set", command[1])
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._queue_cancel(command)
        else:
            loop.call_soon_threadsafe(self._queue_cancel, command)

    def _queue_cancel(self, command: Command) -> None:
        fut = self._pipeline.submit(command)
        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() is None else log.warning(
            "could not set the cancel marker %s: %s (the request may still run)", command[1], f.exception()))

    # --- the reader task -----------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._run(flows.read_loop(self._core)), name=f"headrace-reader-{self.client_id}")

    async def _wake_reader(self) -> None:
        """Best-effort CLIENT UNBLOCK of the reader's XREAD (see :meth:`Client._wake_reader`)."""
        conn_id = self._core.reader_conn_id
        if conn_id is None:
            return
        try:
            await self._redis.client_unblock(conn_id)
        except redis.RedisError as e:
            log.debug("CLIENT UNBLOCK failed: %s", e)
