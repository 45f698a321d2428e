"""Autoscaling a stream-worker deployment on its stream's backlog (a Ray Serve custom policy).

Serve's default policy counts requests in flight *through Serve*; our replicas get their work
from Redis, so Serve sees none. This policy instead reads the model's consumer group:

    backlog = (lag + inbox + pending) x samples_per_entry
    desired = ceil(backlog / target_backlog_per_replica)

``lag``: entries not yet delivered to the group; ``inbox``: checked requests still waiting
in the model's inbox (strict submit mode: only a running worker relays them into the
stream, so at zero replicas this is the whole backlog); ``pending``: delivered, unacked;
``samples_per_entry``: the moving average the workers publish in the model's limits hash
(multi-sample entries; 1 when absent), so the target is in samples, like ``max_batch``.

and Serve applies the deployment's ``min_replicas`` / ``max_replicas``, ``upscale_delay_s`` /
``downscale_delay_s`` and up/down-scaling factors on top (``_apply_autoscaling_config``).

Where the numbers come from: the policy polls ``XINFO GROUPS`` itself (cached for
``poll_interval_s``; it runs in the Serve controller on every control-loop tick, so the
poll must stay cheap), which also works at zero replicas (scale from zero). Replicas also
report ``headrace_lag`` / ``headrace_pending`` through ``record_autoscaling_stats``; the
policy falls back to the largest replica report when Redis cannot be polled.

Configured in a deployment's ``autoscaling_config``::

    policy:
      policy_function: headrace.cluster.serve.autoscale:LagAutoscalingPolicy
      policy_kwargs: {redis_url: ..., namespace: headrace, model: minilm, group: workers,
                      target_backlog_per_replica: 64}
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from headrace.client.config import (
    DEFAULT_GROUP,
    DEFAULT_NAMESPACE,
    Settings,
    redact_url,
    require,
    resolve_redis_url,
    validate_model_name,
    validate_namespace,
)
from headrace.client.errors import BrokerError
from headrace.client.keys import ModelKeys, partition_keys, validate_partitions
from headrace.client.sharding import sync_client
from headrace.workers.broker.backlog import group_backlog, last_entry_id, samples_per_entry

log = logging.getLogger(__name__)

POLICY_IMPORT_PATH = "headrace.cluster.serve.autoscale:LagAutoscalingPolicy"
# Keys of the replica-reported custom autoscaling metrics (record_autoscaling_stats).
LAG_METRIC = "headrace_lag"
PENDING_METRIC = "headrace_pending"


@dataclasses.dataclass(frozen=True)
class LagPolicySettings(Settings):
    """Arguments of :class:`LagAutoscalingPolicy` (``policy_kwargs``; JSON values only).

    Attributes:
        redis_url: Redis holding the model's stream (empty: ``HEADRACE_REDIS_URL``, else the default).
        namespace / model / group: which consumer group to read.
        target_backlog_per_replica: backlog one replica should carry, in samples (entries
            queued, in the inbox or pending, times the samples they carry); roughly
            ``max_batch`` times the batches a replica clears in the tolerated delay.
        poll_interval_s: shortest time between two Redis polls.
        redis_timeout_s: socket timeout of a poll (the controller waits this long at most).
        partitions: the model's request streams (the workers' ``partitions``); the backlog
            is their sum.
        redis_cluster: ``redis_url`` names a Redis Cluster node.
    """

    redis_url: str = ""
    namespace: str = DEFAULT_NAMESPACE
    model: str = "minilm"
    group: str = DEFAULT_GROUP
    target_backlog_per_replica: float = 64.0
    poll_interval_s: float = 1.0
    redis_timeout_s: float = 0.5
    partitions: int = 1
    redis_cluster: bool = False

    def validate(self) -> None:
        validate_namespace(self.namespace)
        validate_model_name(self.model)
        require(bool(self.group), "group", "must be a non-empty consumer group name")
        require(self.target_backlog_per_replica > 0, "target_backlog_per_replica",
                "must be > 0 samples, e.g. 4 x max_batch")
        require(self.poll_interval_s >= 0, "poll_interval_s", "must be >= 0 s")
        require(self.redis_timeout_s > 0, "redis_timeout_s", "must be > 0 s")
        validate_partitions(self.partitions)


def desired_replicas(backlog: float, target_backlog_per_replica: float) -> float:
    """Replicas needed for ``backlog`` samples at ``target_backlog_per_replica`` each.

    May be 0 (an empty queue); Serve clamps the result to ``[min_replicas, max_replicas]``.
    """
    if backlog <= 0:
        return 0.0
    return float(math.ceil(backlog / target_backlog_per_replica))


def read_backlog(client: Any, keys: ModelKeys) -> tuple[int, int]:
    """``(lag, pending)`` of the model's consumer group, from ``XINFO GROUPS`` and ``XLEN``
    (read as :func:`headrace.workers.broker.backlog.group_backlog` does). A stream that does
    not exist yet has no backlog; one without the group has all its entries unread.

    Raises:
        BrokerError: Redis is unreachable or answered unexpectedly.
    """
    import redis

    try:
        pipe = client.pipeline(transaction=False)
        pipe.xinfo_groups(keys.requests)
        pipe.xlen(keys.requests)
        pipe.xrevrange(keys.requests, "+", "-", count=1)
        groups, length, tail = pipe.execute()
    except redis.ResponseError as e:
        if "no such key" in str(e).lower():
            return 0, 0
        raise BrokerError(f"XINFO GROUPS {keys.requests} failed: {e}") from e
    except redis.RedisError as e:
        raise BrokerError(f"cannot read the backlog of {keys.requests}: {e}") from e
    backlog = group_backlog(groups, keys.group, int(length), last_entry_id(tail))
    return backlog.lag, backlog.pending


def read_queued(client: Any, keys: ModelKeys) -> tuple[int, float]:
    """``(inbox, samples_per_entry)``: the entries waiting in the model's inbox (strict submit
    mode; the relay of a running worker moves them into the stream) and the samples an entry
    carries lately, as the workers publish it in the limits hash (1.0 when absent or not a
    number >= 1).

    Raises:
        BrokerError: Redis is unreachable or answered unexpectedly.
    """
    import redis

    try:
        pipe = client.pipeline(transaction=False)
        pipe.llen(keys.inbox)
        pipe.hget(keys.limits, "samples_per_entry")
        inbox, raw = pipe.execute()
    except redis.RedisError as e:
        raise BrokerError(f"cannot read the inbox of {keys.requests}: {e}") from e
    return int(inbox), samples_per_entry(raw)


class LagAutoscalingPolicy:
    """Serve custom autoscaling policy (class form: Serve instantiates it once with
    ``policy_kwargs`` and calls it every control-loop tick).

    Args:
        **kwargs: the fields of :class:`LagPolicySettings`.

    Raises:
        ConfigError: invalid kwargs (at deploy time, in the controller).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.settings = LagPolicySettings(**kwargs)
        self.keys = ModelKeys(self.settings.namespace, self.settings.model, self.settings.group)
        self.parts = partition_keys(self.settings.namespace, self.settings.model, self.settings.partitions,
                                    self.settings.group)
        self._client: Any = None
        self._last_poll = -math.inf
        self._last: tuple[int, int] | None = None
        #: samples per entry of the last poll (1.0 until one succeeds).
        self.samples_per_entry = 1.0

    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.exceptions import RedisClusterException

            url = resolve_redis_url(self.settings.redis_url)
            try:  # a cluster client connects at once, to learn the slot map
                self._client = sync_client(url, self.settings.redis_cluster,
                                           socket_timeout=self.settings.redis_timeout_s,
                                           socket_connect_timeout=self.settings.redis_timeout_s)
            except (redis.RedisError, RedisClusterException) as e:
                raise BrokerError(f"cannot reach Redis at {redact_url(url)}: {e}") from e
        return self._client

    def poll(self, now: float | None = None) -> tuple[int, int] | None:
        """``(lag + inbox, pending)`` in entries, summed over the partitions, from Redis, at most
        once per ``poll_interval_s`` (also sets :attr:`samples_per_entry`); None when
        unreachable."""
        now = time.monotonic() if now is None else now
        if now - self._last_poll < self.settings.poll_interval_s and self._last is not None:
            return self._last
        self._last_poll = now
        try:
            each = [read_backlog(self._redis(), keys) for keys in self.parts]
            queued = [read_queued(self._redis(), keys) for keys in self.parts]
            inbox = sum(n for n, _ in queued)
            self._last = sum(lag for lag, _ in each) + inbox, sum(pending for _, pending in each)
            self.samples_per_entry = max(per_entry for _, per_entry in queued)
        except BrokerError as e:
            log.warning("autoscaling %s: %s; using replica reports", self.keys.model, e)
            self._last = None
        return self._last

    @staticmethod
    def from_replicas(aggregated: dict[str, dict[Any, float]] | None) -> tuple[int, int] | None:
        """Backlog from the replicas' ``record_autoscaling_stats`` (each replica sees the
        same shared group, so take the largest report, not the sum)."""
        if not aggregated or LAG_METRIC not in aggregated:
            return None
        lag = max(aggregated.get(LAG_METRIC, {}).values(), default=0.0)
        pending = max(aggregated.get(PENDING_METRIC, {}).values(), default=0.0)
        return int(lag), int(pending)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """Desired replica count for the ``ray.serve.config.AutoscalingContext`` ``ctx``."""
        backlog = self.poll()
        source = "redis"
        if backlog is None:
            try:
                backlog = self.from_replicas(ctx.aggregated_metrics)
            except Exception as e:  # noqa: BLE001 - metric aggregation is Serve-internal
                log.warning("autoscaling %s: replica metrics unavailable: %s", self.keys.model, e)
                backlog = None
            source = "replicas"
        state = dict(ctx.policy_state or {})
        if backlog is None:
            # Nothing to go on: hold the current target rather than guess.
            return float(ctx.target_num_replicas), state
        lag, pending = backlog
        per_entry = self.samples_per_entry
        desired = desired_replicas((lag + pending) * per_entry, self.settings.target_backlog_per_replica)
        state.update({"headrace_lag": lag, "headrace_pending": pending, "headrace_source": source,
                      "headrace_samples_per_entry": per_entry, "headrace_desired": desired})
        if desired != ctx.target_num_replicas:
            log.info("autoscaling %s: lag=%d pending=%d x %.1f samples per entry (%s) -> %d replicas (now %d)",
                     self.keys.model, lag, pending, per_entry, source, int(desired), ctx.current_num_replicas)
        return desired, state


def lag_autoscaling_config(policy: LagPolicySettings, *, min_replicas: int, max_replicas: int,
                           upscale_delay_s: float = 2.0, downscale_delay_s: float = 30.0,
                           metrics_interval_s: float = 2.0, look_back_period_s: float = 10.0) -> dict[str, Any]:
    """A Serve ``autoscaling_config`` dict using :class:`LagAutoscalingPolicy`.

    Raises:
        ConfigError: inconsistent bounds or delays.
    """
    require(0 <= min_replicas <= max_replicas and max_replicas >= 1, "max_replicas",
            f"need 0 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas}) and max_replicas >= 1")
    require(upscale_delay_s >= 0 and downscale_delay_s >= 0, "downscale_delay_s", "delays must be >= 0 s")
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        # Start at the floor on every (re)deploy; the policy raises it from the backlog.
        "initial_replicas": min_replicas,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "metrics_interval_s": metrics_interval_s,
        "look_back_period_s": look_back_period_s,
        "policy": {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": policy.to_dict()},
    }
