"""Worker metrics on ``ray.util.metrics``: what a replica's loop reports shows up in the Ray
dashboard and on Ray's Prometheus endpoint (``ray_``-prefixed), tagged by model, version
and replica.

The families mirror :class:`headrace.workers.metrics.PrometheusMetrics` (same meaning and
units) so the standalone and Ray dashboards read alike; Ray's exporter prefixes each name
with ``ray_`` (``headrace_stream_lag`` is scraped as ``ray_headrace_stream_lag``). See
``docs/operations.md`` and ``docs/grafana/headrace-ray.json``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from headrace.workers.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S

log = logging.getLogger(__name__)

TAG_KEYS = ("model", "version", "replica")

# Names as defined here; Ray exports them as "ray_" + name (counters also get "_total").
REQUEST_SUCCESS = "headrace_request_success"
REQUEST_FAILURE = "headrace_request_failure"
REQUEST_LATENCY = "headrace_request_latency_seconds"
QUEUE_DURATION_US = "headrace_queue_duration_us"
REQUEST_DURATION_US = "headrace_request_duration_us"
INFER_DURATION_US = "headrace_compute_infer_duration_us"
BATCH_SIZE = "headrace_batch_size"
STREAM_LAG = "headrace_stream_lag"
PENDING = "headrace_pending_requests"
METRIC_NAMES = (REQUEST_SUCCESS, REQUEST_FAILURE, REQUEST_LATENCY, QUEUE_DURATION_US, REQUEST_DURATION_US,
                INFER_DURATION_US, BATCH_SIZE, STREAM_LAG, PENDING)


class _RayFamilies:
    """One set of metric objects per process (Ray keys them by name)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.success = Counter(REQUEST_SUCCESS, "Requests answered ok", TAG_KEYS)
        self.failure = Counter(REQUEST_FAILURE, "Requests answered with an error, expired or dead-lettered, "
                               "by wire code", (*TAG_KEYS, "code"))
        self.latency = Histogram(REQUEST_LATENCY, "Submit-to-result latency (s)",
                                 boundaries=list(LATENCY_BUCKETS_S), tag_keys=TAG_KEYS)
        self.queue_us = Counter(QUEUE_DURATION_US, "Cumulative submit-to-batch time (us)", TAG_KEYS)
        self.request_us = Counter(REQUEST_DURATION_US, "Cumulative submit-to-result time (us)", TAG_KEYS)
        self.infer_us = Counter(INFER_DURATION_US, "Cumulative model run time per request (us)", TAG_KEYS)
        self.batch = Histogram(BATCH_SIZE, "Requests per model run",
                               boundaries=[float(b) for b in BATCH_SIZE_BUCKETS], tag_keys=TAG_KEYS)
        self.lag = Gauge(STREAM_LAG, "Entries not yet delivered to the consumer group", TAG_KEYS)
        self.pending = Gauge(PENDING, "Delivered but unacknowledged entries", TAG_KEYS)


_FAMILIES: _RayFamilies | None = None
_LOCK = threading.Lock()


def _families() -> _RayFamilies:
    global _FAMILIES
    with _LOCK:
        if _FAMILIES is None:
            _FAMILIES = _RayFamilies()
        return _FAMILIES


class RayWorkerMetrics:
    """:class:`~headrace.workers.metrics.WorkerMetrics` on Ray's metrics, for a replica.

    Must be created inside a Ray worker process (a Serve replica). Never raises from the
    ``observe``/``set`` methods: a metrics hiccup must not fail a batch.

    Args:
        model, version: served model and repository version (tags).
        replica: the replica's id (tag), e.g. Serve's ``replica_id.unique_id``.
    """

    def __init__(self, model: str, version: str, replica: str) -> None:
        self._f = _families()
        self._tags = {"model": model, "version": version or "latest", "replica": replica}

    def _safe(self, what: str, fn: Any, *args: Any, **kw: Any) -> None:
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - metrics must never fail the worker loop
            log.debug("ray metric %s failed: %s", what, e)

    def observe_batch(self, size: int, infer_s: float) -> None:
        self._safe("batch", self._f.batch.observe, float(size), tags=self._tags)
        if size > 0:
            self._safe("infer", self._f.infer_us.inc, max(0.0, infer_s) * 1e6 * size, tags=self._tags)

    def observe_request(self, status: str, code: str, queue_s: float, total_s: float) -> None:
        if status == "ok":
            self._safe("success", self._f.success.inc, 1.0, tags=self._tags)
        else:
            self._safe("failure", self._f.failure.inc, 1.0, tags={**self._tags, "code": code or status})
        if queue_s > 0:
            self._safe("queue", self._f.queue_us.inc, queue_s * 1e6, tags=self._tags)
        if total_s > 0:
            self._safe("total", self._f.request_us.inc, total_s * 1e6, tags=self._tags)
            self._safe("latency", self._f.latency.observe, total_s, tags=self._tags)

    def set_backlog(self, lag: int, pending: int) -> None:
        self._safe("lag", self._f.lag.set, float(lag), tags=self._tags)
        self._safe("pending", self._f.pending.set, float(pending), tags=self._tags)
