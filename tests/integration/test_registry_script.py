"""The REGISTER script against a real Redis, read back through ``headrace.client.registry``:
per-worker versions, per-version signatures, server-time liveness, leaving workers."""

from __future__ import annotations

import json

import pytest
import redis

from headrace.client.registry import read_model, read_registry
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.settings import WorkerSettings


def _facts(version: str, max_batch: int = 8) -> dict[str, object]:
    return {"version": version, "backend": "fake", "max_batch": max_batch, "preferred_batch": 0,
            "max_wait_ms": 5.0, "host": "h", "pid": 1}


@pytest.mark.timeout(30)
async def test_workers_of_two_versions_and_their_signatures(redis_url: str) -> None:
    s = WorkerSettings(model="affine", redis_url=redis_url)
    a, b = RedisBroker(s.replace(consumer="a")), RedisBroker(s.replace(consumer="b"))
    r = redis.Redis.from_url(redis_url)
    try:
        await a.heartbeat(_facts("1"), {"inputs": [{"name": "x"}], "outputs": []})
        await b.heartbeat(_facts("2", max_batch=32), {"inputs": [], "outputs": [{"name": "y"}]})
        rec, now = read_model(r, "headrace", "affine")
        assert rec is not None
        assert [w.consumer for w in rec.live_workers(now)] == ["a", "b"]
        assert rec.versions(now) == ("2", "1")
        assert rec.workers["b"].max_batch == 32 and rec.workers["a"].version == "1"
        # empty lists survive the script (stored as JSON text, never re-encoded by cjson)
        assert rec.signature("1") == {"inputs": [{"name": "x"}], "outputs": []}
        assert rec.signature() == {"inputs": [], "outputs": [{"name": "y"}]}
        assert abs(rec.workers["a"].seen_ms - now) < 5_000  # server time, not the worker's clock

        await a.unregister()
        rec, now = read_model(r, "headrace", "affine")
        assert rec is not None and [w.consumer for w in rec.live_workers(now)] == ["b"]
        assert set(rec.signatures) == {"2"}  # v1 is no longer served by anyone

        await b.unregister()
        records, _ = read_registry(r, "headrace")
        rec = records["affine"]
        # registered once, nobody serving now: the newest signature stays describable
        assert rec.workers == {} and set(rec.signatures) == {"2"}
    finally:
        await a.close()
        await b.close()
        r.close()


@pytest.mark.timeout(30)
async def test_stale_workers_are_pruned_by_the_next_heartbeat(redis_url: str) -> None:
    s = WorkerSettings(model="affine", redis_url=redis_url)
    a, b = RedisBroker(s.replace(consumer="a")), RedisBroker(s.replace(consumer="b"))
    r = redis.Redis.from_url(redis_url)
    try:
        await a.heartbeat(_facts("1"), None)
        raw = json.loads(r.hget("headrace:models", "affine"))
        raw["workers"]["a"]["seen_ms"] -= 120_000  # a heartbeat two minutes old
        r.hset("headrace:models", "affine", json.dumps(raw))
        await b.heartbeat(_facts("1"), None, stale_ms=30_000)
        rec, _ = read_model(r, "headrace", "affine")
        assert rec is not None and set(rec.workers) == {"b"}
    finally:
        await a.close()
        await b.close()
        r.close()
