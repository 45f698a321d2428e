"""The stream-worker replica: a Ray Serve deployment wrapping the standalone worker loop.

Serve manages the replicas (placement, restarts, rolling updates, autoscaling); the work
itself does not come through Serve: every replica of a model joins the model's consumer
group in Redis and pulls only when it has room, so the queue balances the load.

Lifecycle, mapped onto Serve's hooks:

* ``__init__``: load the model (or start a tensor-parallel group), start a
  :class:`~headrace.workers.engine.thread.WorkerThread` with a consumer name derived from the
  replica id (unique per replica incarnation), wait until it consumes.
* ``reconfigure(user_config)``: the live worker settings (``max_batch``, ``preferred_batch``,
  ``max_wait_ms``).
* ``check_health``: fails when the loop thread died, one of its tasks died, the
  tensor-parallel group broke, or the loop stayed unhealthy for ``unhealthy_grace_s`` (a
  short Redis outage is ridden out by the loop itself; restarting would not help). Serve
  then replaces the replica.
* ``record_autoscaling_stats``: the group's lag and pending count, for the lag policy.
* ``__del__`` (Serve's graceful shutdown): stop reading, finish and acknowledge in-flight
  batches, then delete the consumer from the group when it owns nothing; so no pending
  entry stays owned by a consumer name that no longer exists. A replica killed outright
  leaves its pending entries to be reclaimed by the others after ``lease_s``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from typing import Any

from headrace.client.errors import BrokerError, ConfigError, ModelError
from headrace.client.optional import require
from headrace.cluster.serve.args import ModelAppArgs
from headrace.cluster.serve.autoscale import LAG_METRIC, PENDING_METRIC
from headrace.cluster.serve.metrics import RayWorkerMetrics
from headrace.workers.backends.base import Servable
from headrace.workers.engine.heap import freeze_startup_heap
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import live_fields

serve = require("ray.serve", "ray", purpose="the Ray Serve worker deployment")
log = logging.getLogger(__name__)


class _BacklogTap:
    """Metrics fan-out that also remembers the last backlog (for autoscaling stats)."""

    def __init__(self, inner: RayWorkerMetrics) -> None:
        self.inner = inner
        self.lag = 0
        self.pending = 0

    def observe_batch(self, size: int, infer_s: float) -> None:
        self.inner.observe_batch(size, infer_s)

    def observe_request(self, status: str, code: str, queue_s: float, total_s: float) -> None:
        self.inner.observe_request(status, code, queue_s, total_s)

    def set_backlog(self, lag: int, pending: int) -> None:
        self.lag, self.pending = lag, pending
        self.inner.set_backlog(lag, pending)


def load_replica_servable(args: ModelAppArgs, settings: Any, name: str = "") -> tuple[Servable, Any]:
    """The servable of one replica and, with tensor parallelism, its encoder group.

    Raises:
        ModelNotFoundError / RepositoryError / ModelError / ConfigError: the model cannot be served.
    """
    if args.fake:
        from headrace.workers.backends.fake import fake_from_env

        env = dict(os.environ)
        if args.fake_delay_ms:
            env["HEADRACE_FAKE_DELAY_MS"] = str(args.fake_delay_ms)
        servable = fake_from_env(args.fake, name=args.model, env=env, reject_non_finite=settings.reject_non_finite)
        # The fake has no repository entry; report the requested version so rolling
        # updates are visible in results.
        servable.version = args.version or servable.version
        return servable, None
    if args.tensor_parallel > 1:
        from headrace.cluster.tp.ranks import load_tp_servable

        return load_tp_servable(settings, args.tensor_parallel, timeout_s=args.tp_timeout_s, backend=args.tp_backend,
                                name=name)
    from headrace.workers.backends import load_servable

    return load_servable(settings), None


def _consumer_name(app: str, replica_id: str) -> str:
    # Readable in XINFO CONSUMERS and unique per incarnation: a restarted replica never
    # silently re-owns the pending entries of the one it replaces.
    base = re.sub(r"[^A-Za-z0-9._-]", "-", f"ray-{app}-{replica_id}")[:80]
    return f"{base}-{uuid.uuid4().hex[:6]}"


class StreamWorkerReplica:
    """One replica of a model's stream workers (see module doc).

    Args:
        args: :class:`~headrace.cluster.serve.app.ModelAppArgs` as a dict (what the app builder binds).

    Raises:
        ConfigError, ModelError, BrokerError: the replica cannot start; Serve retries it.
    """

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ModelAppArgs.from_dict(args)
        try:
            ctx = serve.get_replica_context()
            self.app_name = ctx.app_name or self.args.model
            self.replica_id = ctx.replica_id.unique_id
        except Exception:  # noqa: BLE001 - constructed outside Serve (tests, scripts)
            self.app_name, self.replica_id = self.args.model, uuid.uuid4().hex[:8]
        self.settings = self.args.worker_settings(consumer=_consumer_name(self.app_name, self.replica_id))
        self.metrics = _BacklogTap(RayWorkerMetrics(self.args.model, self.args.version, self.replica_id))
        self.tp: Any = None
        self.thread: WorkerThread | None = None
        self._unhealthy_since: float | None = None
        started = time.monotonic()
        self.servable, self.tp = load_replica_servable(self.args, self.settings,
                                                       name=f"headrace-tp-{self.app_name}-{self.replica_id}")
        if self.settings.gc_freeze:
            # A replica owns its process, as a standalone worker does. Ray Serve freezes too, at
            # the end of __init__ (RAY_SERVE_FREEZE_GC_ON_STARTUP), but the worker thread below
            # is already serving by then.
            freeze_startup_heap()
        try:
            self.thread = WorkerThread(self.settings, self.servable, metrics=self.metrics).start(timeout_s=60.0)
        except BrokerError:
            self._close_model()
            raise
        if self.tp is not None:
            self.tp.on_broken = self._abandon
        log.info("replica %s of %s consuming as %s (model %s/%s, tp=%d) after %.1fs", self.replica_id,
                 self.app_name, self.settings.consumer, self.args.model, self.servable.version,
                 self.args.tensor_parallel, time.monotonic() - started)

    # --- Serve hooks ----------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply live batching changes from the deployment's ``user_config``.

        Raises:
            ConfigError: a key other than max_batch / preferred_batch / max_wait_ms, or a bad value.
        """
        unknown = set(user_config or {}) - set(live_fields())
        if unknown:
            raise ConfigError(f"user_config keys {sorted(unknown)} cannot change live; allowed: {list(live_fields())}")
        changes = {k: v for k, v in (user_config or {}).items() if v is not None}
        if changes and self.thread is not None:
            self.thread.reconfigure(**changes)
            log.info("replica %s reconfigured: %s", self.replica_id, changes)

    def check_health(self) -> None:
        """Raises ModelError when the replica should be replaced (see module doc)."""
        if self.thread is None or not self.thread.alive:
            raise ModelError(f"replica {self.replica_id}: worker loop is not running")
        if self.thread.failed is not None:
            # A dead task: no grace (a Redis outage gets one), the loop cannot recover.
            raise ModelError(f"replica {self.replica_id}: {self.thread.failed.message}")
        if self.tp is not None and not self.tp.probe(timeout_s=min(10.0, self.args.health_check_timeout_s / 2)):
            raise ModelError(f"replica {self.replica_id}: tensor-parallel group is broken")
        if self.thread.healthy():
            self._unhealthy_since = None
            return
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
        if now - self._unhealthy_since > self.args.unhealthy_grace_s:
            raise ModelError(f"replica {self.replica_id}: worker unhealthy for "
                             f"{now - self._unhealthy_since:.0f}s (Redis unreachable or a loop task died)")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics for :class:`~headrace.cluster.serve.autoscale.LagAutoscalingPolicy`."""
        return {LAG_METRIC: float(self.metrics.lag), PENDING_METRIC: float(self.metrics.pending)}

    def __del__(self) -> None:
        # Serve calls this once on graceful shutdown (scale-down, rolling update, delete).
        thread = getattr(self, "thread", None)
        if thread is not None:
            self.thread = None
            thread.stop(drain=True, timeout_s=self.args.drain_timeout_s + 5.0)
            log.info("replica %s drained and left the group", getattr(self, "replica_id", "?"))
        self._close_model()

    def _abandon(self, reason: str) -> None:
        """The model cannot run any more (a tensor-parallel rank died): stop consuming at
        once without draining, so healthy replicas reclaim the entries after their lease
        instead of this one burning their delivery attempts; the health check then fails
        and Serve replaces the replica."""
        thread = self.thread
        if thread is None:
            return
        log.error("replica %s stops consuming: %s", self.replica_id, reason)
        # Not on the calling (inference) thread: stop() waits for that very thread.
        threading.Thread(target=thread.stop, kwargs={"drain": False, "timeout_s": 30.0},
                         name="headrace-abandon", daemon=True).start()

    # --- admin calls through a handle -----------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Worker counters plus where this replica runs (JSON-able)."""
        import ray

        out: dict[str, Any] = dict(self.thread.stats()) if self.thread is not None else {"running": False}
        out.update(replica=self.replica_id, app=self.app_name, pid=os.getpid(),
                   node_id=str(ray.get_runtime_context().get_node_id()),
                   tensor_parallel=self.args.tensor_parallel)
        if self.tp is not None:
            out["tp_rank_nodes"] = self.tp.rank_nodes()
            out["tp_shards"] = self.tp.reports
            out["tp_rank_actors"] = [f"headrace-tp-{self.app_name}-{self.replica_id}-rank{i}"
                                     for i in range(1, self.args.tensor_parallel)]
        return out

    def _close_model(self) -> None:
        servable = getattr(self, "servable", None)
        if servable is not None:
            try:
                servable.close()
            except Exception as e:  # noqa: BLE001 - closing must not mask the shutdown
                log.warning("closing servable: %s", e)
        tp = getattr(self, "tp", None)
        if tp is not None:
            self.tp = None
            tp.close()


StreamWorkerDeployment: Any = serve.deployment(StreamWorkerReplica, name="StreamWorker")
