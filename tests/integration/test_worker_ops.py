"""Operational surface of a worker on real Redis: Prometheus metrics, dedupe pre-check,
idle-consumer cleanup, status of an unknown model."""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import pytest
import redis

from headrace.client.keys import ModelKeys
from headrace.cluster.ops.embedded_redis import free_port
from headrace.workers.admin.status import model_status
from headrace.workers.backends.fake import AffineServable
from headrace.workers.broker.redis_broker import RedisBroker
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.worker import Collector, affine_request, consumers, pending_count, produce, wait_until, worker_procs


@pytest.mark.timeout(60)
def test_prometheus_metrics_of_a_worker_process(redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    port = free_port()
    with worker_procs(redis_url, tmp_path) as spawn:
        w = spawn("--consumer", "w", "--metrics-port", str(port), "--block-ms", "20")
        produce(r, keys, [affine_request(f"r{i}", 1.0, reply) for i in range(10)]
                + [affine_request("nan", float("nan"), reply)])
        Collector(r, reply).wait_for(11, timeout_s=20)

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    return str(resp.read().decode())
            except OSError:
                return ""

        text = wait_until(lambda: (t := scrape()) and 'headrace_request_success_total{model="affine",version="1"} 10.0' in t
                          and t, timeout_s=10)
        w.signal(signal.SIGTERM)
        assert w.wait(20) == 0
    assert 'headrace_request_failure_total{code="bad_value",model="affine",version="1"} 1.0' in text
    for name in ("headrace_request_duration_us_total", "headrace_queue_duration_us_total",
                 "headrace_compute_infer_duration_us_total", "headrace_request_latency_seconds_bucket",
                 "headrace_batch_size_bucket", "headrace_pending_requests", "headrace_stream_lag"):
        assert name in text, name


@pytest.mark.timeout(30)
def test_already_answered_request_is_acked_without_running(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    r.set(keys.done("seen"), "1-0", ex=60)  # answered before (e.g. by a worker that then died)
    sv = AffineServable()
    wt = WorkerThread(WorkerSettings(model="affine", redis_url=redis_url, consumer="w", block_ms=20), sv).start()
    try:
        produce(r, keys, [affine_request("seen", 1.0, reply), affine_request("new", 1.0, reply)])
        (res,) = Collector(r, reply).wait_for(1, timeout_s=10)
        wait_until(lambda: pending_count(r, keys) == 0)
        assert res.request_id == "new"
        assert "seen" not in sv.invocations and wt.stats()["duplicates"] == 1
    finally:
        wt.stop(timeout_s=10)


async def test_idle_consumer_cleanup_never_deletes_an_owner(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    broker = RedisBroker(WorkerSettings(model="affine", redis_url=redis_url, consumer="me"))
    try:
        await broker.ensure_group()
        produce(r, keys, [affine_request("r0", 1.0, keys.reply("c"))])
        r.xreadgroup(keys.group, "owner", {keys.requests: ">"}, count=1)  # owns a pending entry
        r.xgroup_createconsumer(keys.requests, keys.group, "ghost")  # owns nothing
        assert await broker.delete_idle_consumers(60_000) == []  # nobody idle long enough
        assert await broker.delete_idle_consumers(0) == ["ghost"]
        assert set(consumers(r, keys)) == {"owner"}
        assert await broker.delete_idle_consumers(0, only="owner") == []
    finally:
        await broker.close()


def test_status_of_a_model_nobody_served_yet(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    st = model_status(r, "headrace", "nothing-here")
    assert (st.stream_length, st.lag, st.pending, st.dead_letters, st.consumers, st.workers) == (0, 0, 0, 0, (), ())
    assert st.throughput_rps == 0.0 and st.p50_ms is None and st.to_dict()["model"] == "nothing-here"


@pytest.mark.timeout(30)
def test_commit_survives_an_emptied_script_cache(redis_url: str) -> None:
    """The commit script is sent by EVALSHA alone (no SCRIPT EXISTS per batch); after
    SCRIPT FLUSH (what a Redis restart does to the cache) the NOSCRIPT answer makes it load
    the script and commit, and nothing is answered twice."""
    r = redis.Redis.from_url(redis_url)
    keys = ModelKeys("headrace", "affine")
    reply = keys.reply("c")
    wt = WorkerThread(WorkerSettings(model="affine", redis_url=redis_url, consumer="w", block_ms=20),
                      AffineServable()).start()
    try:
        collector = Collector(r, reply)
        produce(r, keys, [affine_request(f"a{i}", 1.0, reply) for i in range(5)])
        collector.wait_for(5, timeout_s=10)
        before = int(r.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0))
        r.script_flush()
        produce(r, keys, [affine_request(f"b{i}", 2.0, reply) for i in range(5)])
        got = collector.wait_for(10, timeout_s=10)
        wait_until(lambda: pending_count(r, keys) == 0)
        assert sorted(x.request_id for x in got) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)])
        assert all(x.status == "ok" for x in got)
        after = int(r.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0))
        assert after == before  # the hot path never asks whether the script exists
    finally:
        wt.stop(timeout_s=10)
