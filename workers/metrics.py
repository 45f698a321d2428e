"""Worker metrics: one small interface, a null and a Prometheus implementation (the
in-memory one for tests is :class:`headrace.workers.testing.metrics.InMemoryMetrics`).

The loop calls three methods and nothing else, so another exporter (e.g. Ray metrics) only
has to implement :class:`WorkerMetrics`:

* ``observe_batch(size, infer_s)`` once per model run,
* ``observe_request(status, code, queue_s, total_s)`` once per answered (or dead-lettered)
  request, and with status and code :data:`CANCELLED` once per request skipped because its
  producer cancelled it (acknowledged unanswered, never run),
* ``set_backlog(lag, pending)`` periodically.

All durations are in seconds at this interface; the Prometheus exporter converts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol, runtime_checkable

from headrace.client.optional import WORKER, require

log = logging.getLogger(__name__)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CANCELLED = "cancelled"
"""Status and code of a request skipped because its producer cancelled it."""
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@runtime_checkable
class WorkerMetrics(Protocol):
    """What the worker loop reports. Implementations must be cheap and never raise."""

    def observe_batch(self, size: int, infer_s: float) -> None:
        """One model run of ``size`` requests that took ``infer_s`` seconds."""

    def observe_request(self, status: str, code: str, queue_s: float, total_s: float) -> None:
        """One request answered with ``status``/``code``; ``queue_s`` from submit to batch,
        ``total_s`` from submit to the result write (seconds; 0 when unknown)."""

    def set_backlog(self, lag: int, pending: int) -> None:
        """Entries not yet delivered to the group (``lag``) and delivered but unacknowledged
        (``pending``)."""


class NullMetrics:
    """Discards everything."""

    def observe_batch(self, size: int, infer_s: float) -> None:
        pass

    def observe_request(self, status: str, code: str, queue_s: float, total_s: float) -> None:
        pass

    def set_backlog(self, lag: int, pending: int) -> None:
        pass


class _Families:
    """The metric families of one registry (prometheus_client refuses duplicates)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge, Histogram

        lv = ("model", "version")
        # prometheus_client appends "_total" to counter names on exposition (OpenMetrics):
        # headrace_request_duration_us is scraped as headrace_request_duration_us_total.
        self.success = PCounter("headrace_request_success", "Requests answered ok", lv, registry=registry)
        self.failure = PCounter("headrace_request_failure", "Requests answered with an error, expired or "
                                "dead-lettered, by wire code", (*lv, "code"), registry=registry)
        self.cancelled = PCounter("headrace_request_cancelled", "Requests skipped unanswered because their "
                                  "producer cancelled them (never run)", lv, registry=registry)
        self.request_us = PCounter("headrace_request_duration_us", "Cumulative submit-to-result time (us)",
                                   lv, registry=registry)
        self.queue_us = PCounter("headrace_queue_duration_us", "Cumulative submit-to-batch time (us)",
                                 lv, registry=registry)
        self.infer_us = PCounter("headrace_compute_infer_duration_us", "Cumulative model run time per "
                                 "request (us; a batch's time counts once per request in it)", lv,
                                 registry=registry)
        self.latency = Histogram("headrace_request_latency_seconds", "Submit-to-result latency (s)", lv,
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        self.batch = Histogram("headrace_batch_size", "Requests per model run", lv,
                               buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.pending = Gauge("headrace_pending_requests", "Delivered but unacknowledged entries", lv,
                             registry=registry)
        self.lag = Gauge("headrace_stream_lag", "Entries not yet delivered to the consumer group", lv,
                         registry=registry)


_FAMILIES: dict[int, _Families] = {}
_FAMILIES_LOCK = threading.Lock()


def _families(registry: Any) -> _Families:
    with _FAMILIES_LOCK:
        fam = _FAMILIES.get(id(registry))
        if fam is None:
            fam = _FAMILIES[id(registry)] = _Families(registry)
        return fam


class PrometheusMetrics:
    """Triton-like Prometheus metrics labelled by ``model`` and ``version``.

    Args:
        model, version: label values.
        registry: a ``prometheus_client.CollectorRegistry``; the global one by default.

    Raises:
        MissingDependencyError: prometheus-client is not installed (``[worker-cpu]`` / ``[worker-gpu]``).
    """

    def __init__(self, model: str, version: str = "", registry: Any = None) -> None:
        prometheus_client = require("prometheus_client", WORKER, purpose="worker metrics")
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self._f = _families(self.registry)
        self._labels = (model, version)

    def observe_batch(self, size: int, infer_s: float) -> None:
        self._f.batch.labels(*self._labels).observe(size)
        self._f.infer_us.labels(*self._labels).inc(max(0.0, infer_s) * 1e6 * size)

    def observe_request(self, status: str, code: str, queue_s: float, total_s: float) -> None:
        if status == CANCELLED:
            self._f.cancelled.labels(*self._labels).inc()
            return
        if status == "ok":
            self._f.success.labels(*self._labels).inc()
        else:
            self._f.failure.labels(*self._labels, code or status).inc()
        self._f.queue_us.labels(*self._labels).inc(max(0.0, queue_s) * 1e6)
        self._f.request_us.labels(*self._labels).inc(max(0.0, total_s) * 1e6)
        if total_s > 0:
            self._f.latency.labels(*self._labels).observe(total_s)

    def set_backlog(self, lag: int, pending: int) -> None:
        self._f.lag.labels(*self._labels).set(lag)
        self._f.pending.labels(*self._labels).set(pending)


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: Any = None) -> Any:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the server object
    (call ``.shutdown()`` to stop it).

    Raises:
        MissingDependencyError: prometheus-client is not installed (a ``ConfigError``).
        ConfigError: the port cannot be bound.
    """
    from headrace.client.errors import ConfigError

    prometheus_client = require("prometheus_client", WORKER, purpose="the worker metrics endpoint")
    try:
        server, _thread = prometheus_client.start_http_server(
            port, addr=addr, registry=registry if registry is not None else prometheus_client.REGISTRY)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {addr}:{port}: {e}; pick a free metrics_port") from e
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return server
