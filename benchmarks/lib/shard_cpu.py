"""Redis CPU per request on each shard of a Redis Cluster (or of one Redis).

Every node's ``INFO CPU`` (``used_cpu_sys`` + ``used_cpu_user``, seconds, main thread and
background threads) is read before and after a run; the difference divided by the
requests of the run is the CPU one request costs that shard. A node also spends CPU while
idle (``serverCron``, and on a cluster the gossip on the bus), so :meth:`ShardCpu.idle`
measures that rate over a quiet interval and :meth:`ShardCpu.per_request_us` subtracts it
for the run's wall time.

What it implies: a shard saturates when its CPU per request reaches one core-second per
second, so the cluster's ceiling is ``1e6 / max(us per request over the shards)``
requests/s, and spreading a model over K partitions scales near-linearly when each
shard's CPU per request shrinks to about 1/K of the single-partition figure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis


def node_cpu_s(url: str) -> float:
    """``used_cpu_sys + used_cpu_user`` of the node at ``url`` (seconds).

    Raises:
        redis.RedisError: the node does not answer.
    """
    r = redis.Redis.from_url(url, socket_connect_timeout=2.0)
    try:
        cpu = r.info("cpu")
    finally:
        r.close()
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


@dataclass
class ShardCpu:
    """CPU accounting over the nodes at ``urls`` (see module doc).

    Attributes:
        idle_s_per_s: each node's idle CPU rate (CPU seconds per second), from :meth:`idle`.
    """

    urls: Sequence[str]
    idle_s_per_s: dict[str, float] = field(default_factory=dict)
    _before: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _after: dict[str, float] = field(default_factory=dict)
    _t1: float = 0.0

    def snapshot(self) -> dict[str, float]:
        return {u: node_cpu_s(u) for u in self.urls}

    def idle(self, seconds: float = 1.0) -> dict[str, float]:
        """Measure each node's CPU rate while nothing is sent (call before the run)."""
        a, t0 = self.snapshot(), time.perf_counter()
        time.sleep(seconds)
        b, t1 = self.snapshot(), time.perf_counter()
        self.idle_s_per_s = {u: max(0.0, (b[u] - a[u]) / (t1 - t0)) for u in self.urls}
        return self.idle_s_per_s

    def start(self) -> ShardCpu:
        self._before, self._t0 = self.snapshot(), time.perf_counter()
        return self

    def stop(self) -> ShardCpu:
        self._after, self._t1 = self.snapshot(), time.perf_counter()
        return self

    def per_request_us(self, requests: int) -> dict[str, float]:
        """CPU microseconds per request on each node over start..stop, idle rate removed."""
        wall = self._t1 - self._t0
        n = max(1, requests)
        return {u: max(0.0, self._after[u] - self._before[u] - self.idle_s_per_s.get(u, 0.0) * wall) * 1e6 / n
                for u in self.urls}


def implied_ceiling(per_request_us: Mapping[str, float]) -> float:
    """Requests/s at which the busiest shard would use one whole core."""
    worst = max(per_request_us.values(), default=0.0)
    return 1e6 / worst if worst > 0 else float("inf")
