"""The blocking IO shell of :class:`~headrace.client.Client`: it performs the effects of the
shared flows (:mod:`headrace.client.flows`) with redis-py's sync client, futures and a reader
thread. Nothing here decides anything; the flows and the core do.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry

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
    drive,
    iterate,
)
from headrace.client.pipeline import Command, run_submits
from headrace.client.registry import read_model
from headrace.client.sharding import sync_client
from headrace.client.slot_reader import SlotReader
from headrace.client.submit import thread_timeout
from headrace.client.tickets import resolve_all

log = logging.getLogger(__name__)
T = TypeVar("T")


class SyncIO:
    """Connections, the reply reader thread and the effect handlers of one sync client.

    Args:
        core: the client's core (its settings say where Redis is).
    """

    def __init__(self, core: ClientCore) -> None:
        s = core.settings
        self.core = core
        self.redis: redis.Redis = sync_client(
            s.effective_redis_url, s.redis_cluster, retry=RedisRetry(connection_backoff(s), s.connect_retries),
            **connection_options(s))
        self.reader_redis: redis.Redis | None = None  # created by the reader thread
        # On a Redis Cluster the reply streams of a partitioned model span slots: read by slot.
        self.slot_reader = SlotReader() if s.redis_cluster else None
        self.closed = threading.Event()
        self._reader: threading.Thread | None = None
        self._reader_lock = threading.Lock()
        self._registry_lock = threading.Lock()
        self._handlers: dict[type, Callable[[Any], Any]] = {
            Send: self._send, Wait: self._wait, WaitAll: self._wait_all, WaitAny: self._wait_any,
            Sleep: self._sleep, WakeReader: self._wake, ReadModel: self._read_model, ReaderId: self._reader_id,
            Delete: self._delete, XRead: self._xread, Resolve: self._resolve,
        }
        core.cancel_sink = self.send_cancel

    def run(self, flow: Flow[T]) -> T:
        return drive(flow, self.perform)

    def iterate(self, flow: Flow[None]) -> Iterator[Any]:
        return iterate(flow, self.perform)

    def perform(self, effect: Effect) -> Any:
        return self._handlers[type(effect)](effect)

    def close(self) -> None:
        """Fail the outstanding tickets (their waiters get :class:`RequestCancelled` at
        once), stop the reader, drop the reply streams when nothing was outstanding, disconnect."""
        if self.closed.is_set():
            return
        streams = self.core.shut("Client")
        self.closed.set()
        self.wake_reader()
        # Called from the reader itself (a done-callback runs in the thread that completes the
        # ticket), joining would raise; the reader leaves its loop once the callback returns.
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(self.core.settings.reply_block_ms / 1000 + 5)
        try:
            if streams:
                self.redis.delete(*streams)
        except redis.RedisError as e:
            log.debug("could not delete reply streams on close: %s", e)
        if self.reader_redis is not None:
            self.reader_redis.close()
        self.redis.close()

    def send_cancel(self, command: Command) -> None:
        try:
            self.redis.execute_command(*command)
        except redis.RedisError as e:
            log.warning("could not set the cancel marker %s: %s (the request may still run)", command[1], e)

    def safe_url(self) -> str:
        if self.slot_reader is not None:
            node = self.redis.get_default_node()  # type: ignore[attr-defined]
            return f"{node.host}:{node.port} (Redis Cluster)"
        kw = self.redis.connection_pool.connection_kwargs
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}"

    # --- effects ---------------------------------------------------------------------------

    def _send(self, effect: Send) -> list[Any]:
        try:
            return run_submits(self.redis, effect.commands)
        except redis.RedisError as e:
            return [e] * len(effect.commands)

    def _wait(self, effect: Wait) -> bool:
        done, _ = concurrent.futures.wait([effect.ticket._thread_future()], timeout=thread_timeout(effect.timeout_s))
        return bool(done)

    def _wait_all(self, effect: WaitAll) -> int:
        _, not_done = concurrent.futures.wait([t._thread_future() for t in effect.tickets],
                                          timeout=thread_timeout(effect.timeout_s))
        return len(not_done)

    def _wait_any(self, effect: WaitAny) -> list[Any]:
        by_future = {t._thread_future(): t for t in effect.tickets}
        done, _ = concurrent.futures.wait(by_future, timeout=thread_timeout(effect.timeout_s),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        return [by_future[f] for f in done]

    def _sleep(self, effect: Sleep) -> None:
        self.closed.wait(effect.seconds)  # ends early when the client closes

    def _wake(self, effect: WakeReader) -> None:
        self._ensure_reader()
        self.wake_reader()

    def _read_model(self, effect: ReadModel) -> Any:
        with self._registry_lock:  # one read at a time; the others find it cached
            cached = self.core.registry.cached(effect.model) if effect.cached_ok else None
            return cached or read_model(self.redis, self.core.settings.namespace, effect.model)

    def _reader_id(self, effect: ReaderId) -> int:
        if self.slot_reader is not None:
            return 0  # a cluster reader blocks in short slices: nothing to wake
        return int(self._reader_client().client_id())

    def _delete(self, effect: Delete) -> None:
        pipe = self._reader_client().pipeline(transaction=False)
        for stream, ids in effect.entries.items():
            pipe.xdel(stream, *ids)
        pipe.execute()

    def _xread(self, effect: XRead) -> Any:
        streams: dict[Any, Any] = dict(effect.streams)
        if self.slot_reader is not None:
            return self.slot_reader.read(self._reader_client(), streams, effect.count, effect.block_ms)
        return self._reader_client().xread(streams, count=effect.count, block=effect.block_ms)

    def _resolve(self, effect: Resolve) -> None:
        resolve_all(effect.answered)

    # --- the reader ----------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._reader is not None:
            return
        with self._reader_lock:
            if self._reader is None:
                self._reader = threading.Thread(target=self.run, args=(flows.read_loop(self.core),),
                                                name=f"headrace-reader-{self.core.client_id}", daemon=True)
                self._reader.start()

    def wake_reader(self) -> None:
        """Interrupt the reader's blocking XREAD so it re-reads its stream list at once.
        Best effort: without it (e.g. an ACL without CLIENT), new streams join the read
        after at most ``reply_block_ms``."""
        conn_id = self.core.reader_conn_id
        if conn_id is None or self.slot_reader is not None:
            return
        try:
            self.redis.client_unblock(conn_id)
        except redis.RedisError as e:
            log.debug("CLIENT UNBLOCK failed (%s); the reader picks up new streams within %d ms",
                      e, self.core.settings.reply_block_ms)

    def _reader_client(self) -> redis.Redis:
        """The reader's own single connection (connects at once, so it is made here, in the
        reader's retry loop). Its CLIENT ID lets submitters wake a blocked XREAD (CLIENT
        UNBLOCK) when a new reply stream must join it. redis-py's retries are off: the
        loop has its own backoff and logging."""
        if self.reader_redis is None:
            s = self.core.settings
            self.reader_redis = sync_client(
                s.effective_redis_url, s.redis_cluster, single_connection_client=True, retry=RedisRetry(NoBackoff(), 0),
                socket_timeout=s.reply_block_ms / 1000 + 10)
        return self.reader_redis
