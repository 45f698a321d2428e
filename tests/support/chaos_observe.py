"""Chaos-test observation of Redis: the model and namespace the chaos runs use, a polling
wait, the ``workers`` group's pending state, the worker registry, key counts and a
background :class:`Sampler` of stream length, dedupe markers and memory.

Re-exported by :mod:`tests.support.chaos`, which builds its fleet, producer and ledger on it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from headrace.client.keys import ModelKeys
from tests.support.polling import poll_until

MODEL = "affine"
NS = "headrace"


def wait_until(cond: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "") -> Any:
    """Poll ``cond`` until truthy; raise AssertionError after ``timeout_s``."""
    return poll_until(cond, timeout_s, interval_s, what or str(cond))


def wait_nothing_pending(r: redis.Redis, timeout_s: float) -> None:
    """Wait until the ``workers`` group has no pending entry (AssertionError after ``timeout_s``)."""
    wait_until(lambda: group_state(r).get("pending", 1) == 0, timeout_s, what="nothing pending")


def group_state(r: redis.Redis) -> dict[str, Any]:
    """Pending count, lag and consumers of the ``workers`` group (empty when absent)."""
    keys = ModelKeys(NS, MODEL)
    try:
        groups = r.xinfo_groups(keys.requests)
        consumers = r.xinfo_consumers(keys.requests, keys.group)
    except redis.ResponseError:
        return {}
    g = next((g for g in groups if g["name"] == keys.group.encode()), None)
    if g is None:
        return {}
    return {"pending": int(g["pending"]), "lag": int(g.get("lag") or 0),
            "consumers": {c["name"].decode(): int(c["pending"]) for c in consumers}}


def registered_workers(r: redis.Redis) -> set[str]:
    """Workers whose heartbeat is in the ``<ns>:models`` registry (consumers only show up in
    XINFO CONSUMERS once they were delivered something, so this is how to see idle ones)."""
    raw = r.hget(f"{NS}:models", MODEL)
    try:
        return set(json.loads(raw)["workers"]) if raw else set()
    except (ValueError, KeyError, TypeError):
        return set()


def count_keys(r: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in r.scan_iter(match=pattern, count=1000))


class Sampler(threading.Thread):
    """Samples stream length, dedupe-marker count and Redis memory every ``interval_s``."""

    def __init__(self, url: str, interval_s: float = 0.25) -> None:
        super().__init__(name="sampler", daemon=True)
        self.url, self.interval_s = url, interval_s
        self.samples: list[dict[str, float]] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def sample(self, r: redis.Redis) -> dict[str, float]:
        keys = ModelKeys(NS, MODEL)
        info = r.info("memory")
        xinfo = r.xinfo_stream(keys.requests) if r.exists(keys.requests) else {"length": 0, "entries-added": 0}
        g = group_state(r)
        raw = float(g.get("lag", 0) + g.get("pending", 0))
        # "backlog" is bounded by the stream length (unread and pending entries are all in
        # it); "xinfo_backlog" is what XINFO GROUPS says, which Redis 7.0 can inflate for good
        # after an AOF rewrite and a restart (the phantom lag the soak run found).
        return {"t": time.monotonic(), "xlen": float(xinfo["length"]),
                "backlog": min(raw, float(xinfo["length"])), "xinfo_backlog": raw,
                "added": float(xinfo.get("entries-added", 0) or 0),
                "done_keys": float(count_keys(r, keys.done_prefix + "*")),
                "used_memory": float(info["used_memory"]), "dbsize": float(r.dbsize())}

    def run(self) -> None:
        r = redis.Redis.from_url(self.url, socket_timeout=5)
        while not self._halt.wait(self.interval_s):
            with contextlib.suppress(redis.RedisError):
                self.samples.append(self.sample(r))
        r.close()

    def peak(self, key: str) -> float:
        return max((s[key] for s in self.samples), default=0.0)
