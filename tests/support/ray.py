"""Helpers of the Ray e2e tests: a module-scoped local Ray + Serve, raw producers and
reply-stream collectors (every result kept, duplicates included)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from headrace.client.keys import ModelKeys
from headrace.client.protocol import Envelope, Request, Result, decode_result, encode_request
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_port
from tests.support.polling import poll_until

ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.2,
               what: str = "condition") -> Any:
    """Poll ``cond`` until truthy; AssertionError after ``timeout_s``."""
    return poll_until(cond, timeout_s, interval_s, what)


@dataclass
class RayEnv:
    """One local Ray instance with Serve, shared by the tests of a module."""

    redis: EmbeddedRedis
    deployer: Any
    http_port: int
    metrics_port: int

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def r(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)


@contextmanager
def local_ray(num_cpus: int = 4) -> Iterator[RayEnv]:
    """Start Redis, Ray (no dashboard; metrics export on a free port) and Serve's proxy on
    a free port; tear everything down at the end."""
    import ray
    from ray import serve

    from headrace.cluster.ops.lifecycle import LocalDeployer

    with EmbeddedRedis() as rs:
        metrics_port = free_port()
        # address="local": never join another Ray found on the machine (other test runs).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
                 log_to_driver=False, configure_logging=False)
        http_port = free_port()
        try:
            yield RayEnv(rs, LocalDeployer(http_options={"host": "127.0.0.1", "port": http_port}),
                         http_port, metrics_port)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def affine_entry(rid: str, value: float, reply_to: str, model: str) -> dict[bytes, bytes]:
    return encode_request(Request(Envelope(rid, reply_to, model=model), inputs={"x": np.full(4, value, np.float32)}))


class RawProducer:
    """XADDs wire-protocol requests straight into a model's stream (no SDK) and reads the
    reply stream it named."""

    def __init__(self, r: redis.Redis, model: str, namespace: str = "headrace") -> None:
        self.r = r
        self.keys = ModelKeys(namespace, model)
        self.reply_to = self.keys.reply(f"raw-{uuid.uuid4().hex[:8]}")
        self.sent: list[str] = []
        self.values: dict[str, float] = {}
        self.results: list[Result] = []
        self._last = "0-0"

    def send(self, n: int, start: float = 0.0) -> list[str]:
        ids = []
        pipe = self.r.pipeline(transaction=False)
        for i in range(n):
            rid = f"raw-{len(self.sent) + i}-{uuid.uuid4().hex[:6]}"
            value = start + i
            self.values[rid] = value
            pipe.xadd(self.keys.requests, affine_entry(rid, value, self.reply_to, self.keys.model))  # type: ignore[arg-type]
            ids.append(rid)
        pipe.execute()
        self.sent += ids
        return ids

    def send_texts(self, texts: Sequence[str]) -> list[str]:
        ids = []
        pipe = self.r.pipeline(transaction=False)
        for text in texts:
            rid = f"raw-{len(self.sent) + len(ids)}-{uuid.uuid4().hex[:6]}"
            entry = encode_request(Request(Envelope(rid, self.reply_to, model=self.keys.model), text=text))
            pipe.xadd(self.keys.requests, entry)  # type: ignore[arg-type]
            ids.append(rid)
        pipe.execute()
        self.sent += ids
        return ids

    def poll(self) -> int:
        while True:
            got = self.r.xread({self.reply_to: self._last}, count=1000)
            if not got:
                return len(self.results)
            for entry_id, fields in got[0][1]:
                self._last = entry_id.decode()
                self.results.append(decode_result(fields))

    def wait_all(self, timeout_s: float = 120.0) -> list[Result]:
        wait_until(lambda: self.poll() >= len(self.sent) and self._complete(), timeout_s,
                   what=f"{len(self.sent)} results on {self.reply_to}")
        return self.results

    def _complete(self) -> bool:
        return set(self.sent) <= {r.request_id for r in self.results}

    def duplicates(self) -> dict[str, int]:
        c = Counter(r.request_id for r in self.results)
        return {k: n for k, n in c.items() if n > 1}


def group_consumers(r: redis.Redis, keys: ModelKeys) -> list[dict[str, Any]]:
    """XINFO CONSUMERS of the model's group, names decoded."""
    out = []
    for c in r.xinfo_consumers(keys.requests, keys.group):
        name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
        out.append({**c, "name": name})
    return out


def group_backlog(r: redis.Redis, keys: ModelKeys) -> tuple[int, int]:
    for g in r.xinfo_groups(keys.requests):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == keys.group:
            return int(g.get("lag") or 0), int(g["pending"])
    return 0, 0


def serve_replicas(deployer: Any, app: str) -> list[Any]:
    """RUNNING worker replicas of ``app`` (ops.ReplicaRow)."""
    from headrace.cluster.ops.lifecycle import replicas

    return [r for r in replicas(deployer.details()) if r.app == app and r.state == "RUNNING"
            and r.deployment == "StreamWorker"]


def replica_actor(app: str, replica_id: str) -> Any:
    """The Ray actor handle of a Serve replica."""
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(f"#{replica_id}") and f"{app}#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no actor for replica {replica_id} of {app}")


def named_actor(name: str) -> Any:
    """A named actor in whatever namespace it was created."""
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"] == name:
            return ray.get_actor(name, namespace=a["namespace"])
    raise AssertionError(f"no actor named {name}")


def results_by_id(results: Sequence[Result]) -> dict[str, Result]:
    return {r.request_id: r for r in results}
