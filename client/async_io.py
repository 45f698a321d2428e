"""The asyncio IO shell of :class:`~headrace.client.AsyncClient`: it performs the effects of
the shared flows (:mod:`headrace.client.flows`) with ``redis.asyncio``, the auto-pipeline and
a reader task. Nothing here decides anything; the flows and the core do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import NoBackoff

from headrace.client import errors as E
from headrace.client import flows
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
from headrace.client.packing import c_packed
from headrace.client.pipeline import AutoPipeline, Command
from headrace.client.registry import aread_model
from headrace.client.sharding import async_client
from headrace.client.slot_reader import AsyncSlotReader
from headrace.client.tickets import Ticket, resolve_all

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncIO:
    """Connections, the submit auto-pipeline, the reply reader task and the effect handlers
    of one asyncio client.

    Args:
        core: the client's core (its settings say where Redis is).
    """

    def __init__(self, core: ClientCore) -> None:
        s = core.settings
        url = s.effective_redis_url
        self.core = core
        # A blocking pool: with more concurrent commands than connections (map/bench with
        # hundreds in flight) callers wait for a free connection instead of failing with
        # "Too many connections". Its connections retry after a Redis restart (redis.asyncio
        # does not by default: the first command on each would fail).
        # On a Redis Cluster: redis-py's cluster client (a pool per node), and the reply
        # streams of a partitioned model read slot by slot (see SyncIO).
        self.slot_reader = AsyncSlotReader() if s.redis_cluster else None
        self.redis: aioredis.Redis = async_client(
            url, True, max_connections=64, retry=AsyncRedisRetry(connection_backoff(s), s.connect_retries),
            **connection_options(s)) if s.redis_cluster else aioredis.Redis.from_pool(
            c_packed(aioredis.BlockingConnectionPool.from_url(
                url, max_connections=64, timeout=s.timeout_s,
                retry=AsyncRedisRetry(connection_backoff(s), s.connect_retries), **connection_options(s))))
        # One dedicated connection for the reader (see SyncIO: CLIENT UNBLOCK needs its id).
        self.reader_redis: aioredis.Redis = async_client(
            url, s.redis_cluster, single_connection_client=True, retry=AsyncRedisRetry(NoBackoff(), 0),
            socket_timeout=s.reply_block_ms / 1000 + 10)
        self.pipeline = AutoPipeline(self.redis)
        self.closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry_reads: dict[str, asyncio.Future[Any]] = {}
        self._handlers: dict[type, Callable[[Any], Awaitable[Any]]] = {
            Send: self._send, Wait: self._wait, WaitAll: self._wait_all, WaitAny: self._wait_any,
            Sleep: self._sleep, WakeReader: self._wake, ReadModel: self._read_model, ReaderId: self._reader_id,
            Delete: self._delete, XRead: self._xread, Resolve: self._resolve,
        }
        core.cancel_sink = self.send_cancel

    def bind_loop(self) -> None:
        """Bind this client to the running event loop on its first use.

        Raises:
            HeadraceError: called from another loop than that one (nothing is sent): its
                connections, auto-pipeline and reader task belong to that loop.
        """
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise E.HeadraceError(
                "AsyncClient is bound to the event loop it first ran on (its connections and reply reader live "
                "there); create one per loop, e.g. inside the coroutine that asyncio.run() runs")

    async def run(self, flow: Flow[T]) -> T:
        self.bind_loop()
        return await adrive(flow, self.perform)

    def iterate(self, flow: Flow[None]) -> AsyncIterator[Any]:
        return aiterate(self._bound(flow), self.perform)

    def _bound(self, flow: Flow[None]) -> Flow[None]:
        # Checks the loop when the iteration starts (in the loop, before the first effect);
        # `yield from` hands an early stop (close) on to the flow, whose cleanup cancels.
        self.bind_loop()
        return (yield from flow)

    async def perform(self, effect: Effect) -> Any:
        return await self._handlers[type(effect)](effect)

    async def close(self) -> None:
        """Fail the outstanding tickets (:class:`RequestCancelled`), send what is queued, stop
        the reader task, drop the reply streams when nothing was outstanding, disconnect.
        From another loop than the client's: on that loop when it still runs, else the
        connections are dropped without IO (never raises for a closed loop)."""
        if self.closed.is_set():
            return
        streams = self.core.shut("AsyncClient")  # waiters of outstanding tickets return now
        self.closed.set()
        loop = self._loop
        if loop is not None and loop is not asyncio.get_running_loop():
            if loop.is_running():  # alive in another thread: disconnect there
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._disconnect(streams), loop))
            else:  # gone (an earlier asyncio.run): nothing can be awaited there any more
                self._abandon()
            return
        await self._disconnect(streams)

    async def _disconnect(self, streams: list[str]) -> None:
        await self.pipeline.aclose()  # submits (and cancel markers) already queued go out first
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already logged by the loop
                pass
        try:
            if streams:
                await self.redis.delete(*streams)
        except redis.RedisError as e:
            log.debug("could not delete reply streams on close: %s", e)
        await self.reader_redis.aclose()
        await self.redis.aclose()

    def _abandon(self) -> None:
        """Drop the connections of a closed event loop without awaiting anything: their
        sockets close when collected (the reply streams expire by ``reply_ttl_s``). The
        single-connection reader client is detached first: redis.asyncio would otherwise
        close it through the dead loop when collected, printing a traceback."""
        for client in (self.reader_redis, self.redis):
            conn = getattr(client, "connection", None)
            if conn is not None:
                client.connection = None
                with contextlib.suppress(RuntimeError):  # "Event loop is closed"
                    conn._close()

    def send_cancel(self, command: Command) -> None:
        """Queue a cancel marker on the auto-pipeline (from any thread; best effort)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self.closed.is_set():
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
        fut = self.pipeline.submit(command)
        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() is None else log.warning(
            "could not set the cancel marker %s: %s (the request may still run)", command[1], f.exception()))

    # --- effects ---------------------------------------------------------------------------

    async def _send(self, effect: Send) -> list[Any]:
        futures = [self.pipeline.submit(cmd) for cmd in effect.commands]
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

    async def _wait(self, effect: Wait) -> bool:
        return not await self._pending([effect.ticket], effect.timeout_s, asyncio.ALL_COMPLETED)

    async def _wait_all(self, effect: WaitAll) -> int:
        return len(await self._pending(effect.tickets, effect.timeout_s, asyncio.ALL_COMPLETED))

    async def _wait_any(self, effect: WaitAny) -> list[Ticket]:
        pending = await self._pending(effect.tickets, effect.timeout_s, asyncio.FIRST_COMPLETED)
        return [t for t in effect.tickets if t not in pending]

    async def _pending(self, tickets: Sequence[Ticket], timeout_s: float, when: str) -> set[Ticket]:
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

    async def _sleep(self, effect: Sleep) -> None:
        await asyncio.sleep(effect.seconds)

    async def _wake(self, effect: WakeReader) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self.run(flows.read_loop(self.core)), name=f"headrace-reader-{self.core.client_id}")
        conn_id = self.core.reader_conn_id
        if conn_id is None or self.slot_reader is not None:
            return
        try:  # best effort, see SyncIO.wake_reader
            await self.redis.client_unblock(conn_id)
        except redis.RedisError as e:
            log.debug("CLIENT UNBLOCK failed: %s", e)

    async def _read_model(self, effect: ReadModel) -> Any:
        """One registry read per model at a time: concurrent submit checks share it."""
        if effect.cached_ok:
            cached = self.core.registry.cached(effect.model)
            if cached is not None:
                return cached
            running = self._registry_reads.get(effect.model)
            if running is not None:
                return await asyncio.shield(running)
        task = asyncio.ensure_future(aread_model(self.redis, self.core.settings.namespace, effect.model))
        self._registry_reads[effect.model] = task
        try:
            return await asyncio.shield(task)
        finally:
            if self._registry_reads.get(effect.model) is task:
                del self._registry_reads[effect.model]

    async def _reader_id(self, effect: ReaderId) -> int:
        if self.slot_reader is not None:
            return 0  # a cluster reader blocks in short slices: nothing to wake
        return int(await self.reader_redis.client_id())

    async def _delete(self, effect: Delete) -> None:
        pipe = self.reader_redis.pipeline(transaction=False)
        for stream, ids in effect.entries.items():
            pipe.xdel(stream, *ids)
        await pipe.execute()

    async def _xread(self, effect: XRead) -> Any:
        streams: dict[Any, Any] = dict(effect.streams)
        if self.slot_reader is not None:
            return await self.slot_reader.aread(self.reader_redis, streams, effect.count, effect.block_ms)
        return await self.reader_redis.xread(streams, count=effect.count, block=effect.block_ms)

    async def _resolve(self, effect: Resolve) -> None:
        # Resolve in the next pass of the loop: the reader task first goes on to write the
        # XDEL of these entries, so a caller that wakes up with its result finds them
        # deleted (or on their way).
        asyncio.get_running_loop().call_soon(resolve_all, effect.answered)
