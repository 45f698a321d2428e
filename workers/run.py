"""Run one stream worker as a standalone process (no Ray): load the model, serve metrics,
consume until SIGTERM/SIGINT, drain, exit."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from headrace.workers.backends.base import Servable
from headrace.workers.broker.base import Broker
from headrace.workers.engine.heap import freeze_startup_heap
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.metrics import NullMetrics, PrometheusMetrics, WorkerMetrics, start_metrics_server
from headrace.workers.settings import WorkerSettings

log = logging.getLogger(__name__)


async def serve(settings: WorkerSettings, servable: Servable, *, broker: Broker | None = None,
                metrics: WorkerMetrics | None = None, install_signals: bool = True) -> StreamWorker:
    """Run a :class:`StreamWorker` in the current event loop until it is stopped.

    With ``install_signals``, the first SIGTERM/SIGINT starts a graceful drain
    (``drain_timeout_s``) and a second one abandons in-flight work (it is reclaimed by other
    workers after ``lease_s``). Returns the stopped worker (for its ``stats()``).
    """
    worker = StreamWorker(settings, servable, broker=broker, metrics=metrics)
    loop = asyncio.get_running_loop()
    signals_seen = 0
    stoppers: set[asyncio.Task[None]] = set()

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        drain = signals_seen == 1
        log.info("%s: %s", signal.Signals(signum).name,
                 "draining (send again to stop at once)" if drain else "stopping without drain")
        task = loop.create_task(worker.stop(drain=drain))
        stoppers.add(task)
        task.add_done_callback(stoppers.discard)

    installed: list[int] = []
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal, int(sig))
                installed.append(int(sig))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
                log.debug("cannot install a handler for %s here", sig)
    try:
        await worker.run()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return worker


def run_standalone(settings: WorkerSettings, servable: Servable | None = None, *,
                   metrics: WorkerMetrics | None = None) -> None:
    """Serve ``settings.model`` from this process until SIGTERM/SIGINT (graceful drain).

    Loads the servable from the model repository when ``servable`` is None, serves
    Prometheus metrics on ``settings.metrics_port`` when it is set, and closes the servable
    on exit. Blocks; must run in the main thread for the signal handlers.

    Raises:
        ModelError / RepositoryError: the model cannot be loaded.
        ModelTimeoutError: a model call ran past ``infer_timeout_s`` (the worker stopped).
        WorkerFailed: an internal task of the worker died (the worker stopped).
        ConfigError: the metrics port cannot be bound.
    """
    if servable is None:
        from headrace.workers.backends import load_servable  # type: ignore[attr-defined]  # heavy: ORT / torch

        servable = load_servable(settings)
    assert servable is not None
    if settings.gc_freeze:
        freeze_startup_heap()
    server: Any = None
    try:
        if metrics is None:
            if settings.metrics_port:
                metrics = PrometheusMetrics(settings.model, servable.version)
            else:
                metrics = NullMetrics()
        if settings.metrics_port:
            server = start_metrics_server(settings.metrics_port)
        worker = asyncio.run(serve(settings, servable, metrics=metrics))
        log.info("worker %s exited: %s", worker.consumer, {k: v for k, v in worker.stats().items()
                                                            if isinstance(v, int) and not isinstance(v, bool)})
        if worker.stuck is not None:
            # Exit non-zero so a supervisor restarts us: the stuck call still holds the
            # inference thread (a daemon thread, so it does not keep the process alive).
            raise worker.stuck
        if worker.failed is not None:
            raise worker.failed
    finally:
        if server is not None:
            server.shutdown()
        servable.close()
