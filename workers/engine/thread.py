"""Run a :class:`~headrace.workers.engine.worker.StreamWorker` in its own thread and event
loop, for hosts that are not async (a Ray Serve replica's constructor, tests, notebooks)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from headrace.client import errors as E
from headrace.workers.backends.base import Servable
from headrace.workers.broker.base import Broker
from headrace.workers.engine.worker import StreamWorker, WorkerFailed
from headrace.workers.metrics import WorkerMetrics
from headrace.workers.settings import WorkerSettings, live_fields

log = logging.getLogger(__name__)


class WorkerThread:
    """A stream worker on a daemon thread.

    Args:
        settings, servable, broker, metrics: as for :class:`StreamWorker`.
        name: thread name (default ``headrace-worker-<model>``).

    Example::

        wt = WorkerThread(settings, servable).start()
        ...
        wt.stop(drain=True, timeout_s=30)
    """

    def __init__(self, settings: WorkerSettings, servable: Servable, broker: Broker | None = None,
                 metrics: WorkerMetrics | None = None, name: str | None = None) -> None:
        self.worker = StreamWorker(settings, servable, broker=broker, metrics=metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name=name or f"headrace-worker-{settings.model}",
                                        daemon=True)
        self._error: BaseException | None = None

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.worker.run())
        except BaseException as e:  # noqa: BLE001 - reported through healthy()/stop()
            self._error = e
            log.exception("worker thread %s crashed", self._thread.name)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def start(self, timeout_s: float = 30.0) -> WorkerThread:
        """Start the thread and wait until the worker consumes (its group exists).

        Raises:
            BrokerError: the worker did not start within ``timeout_s`` (Redis unreachable?).
        """
        self._thread.start()
        started = self.worker.started
        waited = 0.0
        while waited < timeout_s:
            if started.wait(min(0.05, timeout_s - waited)):
                return self
            waited += 0.05
            if not self._thread.is_alive():
                raise E.BrokerError(f"worker thread ended during start: {self._error!r}")
        raise E.BrokerError(f"worker did not start within {timeout_s}s; is Redis reachable at "
                            f"{self.worker.settings.effective_redis_url}?")

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop the worker (draining by default) and join the thread.

        Args:
            timeout_s: wait at most this long (default: ``drain_timeout_s`` + 10 s); the
                thread is a daemon, so a stuck backend cannot block interpreter exit.
        """
        loop = self._loop
        if timeout_s is None:
            timeout_s = self.worker.settings.drain_timeout_s + 10.0
        if loop is not None and self._thread.is_alive() and not loop.is_closed():
            try:
                fut = asyncio.run_coroutine_threadsafe(self.worker.stop(drain=drain), loop)
                fut.result(timeout=timeout_s)
            except (RuntimeError, TimeoutError) as e:
                log.warning("stopping worker thread: %s", e)
            except Exception as e:  # noqa: BLE001 - concurrent.futures.TimeoutError and loop teardown races
                log.warning("stopping worker thread: %r", e)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def healthy(self) -> bool:
        """Thread alive and the worker healthy (see :meth:`StreamWorker.healthy`)."""
        return self._thread.is_alive() and self.worker.healthy()

    @property
    def failed(self) -> WorkerFailed | None:
        """Set when an internal task of the worker died (it stopped; replace it)."""
        return self.worker.failed

    def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    def reconfigure(self, **changes: Any) -> None:
        """Change the live settings (thread-safe; validated here, applied on the loop).

        Raises:
            ConfigError: see :meth:`StreamWorker.reconfigure`.
        """
        self.worker.settings.replace(**{k: v for k, v in changes.items() if k in live_fields()})
        loop = self._loop
        if loop is None or loop.is_closed():
            self.worker.reconfigure(**changes)
            return
        fut = asyncio.run_coroutine_threadsafe(self._reconfigure(changes), loop)
        fut.result(timeout=10)

    async def _reconfigure(self, changes: dict[str, Any]) -> None:
        self.worker.reconfigure(**changes)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
