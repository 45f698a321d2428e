"""A one-thread executor whose thread never blocks interpreter exit."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def future_safe(err: BaseException) -> BaseException:
    """``err`` as an exception an asyncio future accepts: a future refuses ``StopIteration``
    (a ``TypeError`` where it is set, and whoever awaits it waits forever), so a servable's
    stray ``next()`` becomes a ``RuntimeError`` that fails its call like any error."""
    if isinstance(err, StopIteration):
        return RuntimeError(f"the call raised StopIteration: {err!r}")
    return err


def _settle(fut: asyncio.Future[Any], result: Any, err: BaseException | None) -> None:
    """On the loop: hand the call's outcome to its future, unless the caller gave up on it
    (cancelled, or timed out through ``asyncio.wait_for``)."""
    if fut.done():
        return
    if err is None:
        fut.set_result(result)
    else:
        fut.set_exception(future_safe(err))


class DaemonExecutor:
    """One daemon thread running calls in order, each answered on the asyncio loop that
    asked for it.

    Not a ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so a model
    call stuck in native code would keep a worker process from ever exiting. And a call
    resolves an ``asyncio.Future`` directly (one ``call_soon_threadsafe``) rather than a
    ``concurrent.futures.Future`` chained to one (``asyncio.wrap_future``): on the 2-core VM
    that chain cost ~40 us of CPU per call on top of the ~125 us the thread hop itself costs
    (``benchmarks/thread_hop.py``), and the worker makes one hop per model call.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._one(*job)
            del job  # hold no reference to the last call's data while idle

    @staticmethod
    def _one(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], fn: Callable[..., Any],
             args: tuple[Any, ...]) -> None:
        if fut.cancelled():  # given up on before it started: skipped, as Future.cancel() would
            return
        result: Any = None
        err: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            err = e
        try:
            loop.call_soon_threadsafe(_settle, fut, result, err)
        except RuntimeError:
            pass  # the loop closed while the call ran: nobody waits for it any more

    def start(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` for the thread; its outcome arrives on the running loop.

        Cancelling the returned future before the thread takes the call skips the call; once
        it runs, it runs to the end (a thread cannot be interrupted) and its outcome is dropped.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the thread, awaited from the event loop.

        Raises:
            BaseException: whatever ``fn`` raised.
        """
        return await self.start(fn, *args)

    def shutdown(self) -> None:
        """Ask the thread to end after the current call (does not wait for it)."""
        self._jobs.put(None)
