"""Loading the submit function (workers, operators, the SDK) and what it enforces, against a
real Redis: version-aware loading, `headrace functions`, the limit workers publish, and the
whole-entry size check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import Client
from headrace.client import errors as E
from headrace.client.functions import (
    LIBRARY_NAME,
    LIBRARY_SOURCE,
    LIBRARY_VERSION,
    Outcome,
    current_code,
    ensure_library,
    library_version,
    plan,
)
from headrace.client.keys import ModelKeys
from headrace.workers.backends.fake import make_fake
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings
from tests.support.polling import poll_until

pytestmark = pytest.mark.timeout(60)
EXE = str(Path(sys.executable).with_name("headrace"))


def variant(version: int) -> str:
    """The library as another version of headrace would ship it."""
    return LIBRARY_SOURCE.replace(f"local LIBRARY_VERSION = {LIBRARY_VERSION}\n", f"local LIBRARY_VERSION = {version}\n")


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.function_flush()
    yield client
    client.function_flush()
    client.close()


def test_plan_never_downgrades() -> None:
    assert plan(None) is Outcome.LOADED
    assert plan(LIBRARY_SOURCE) is Outcome.CURRENT
    assert plan(variant(LIBRARY_VERSION - 1)) is Outcome.REPLACED
    assert plan(LIBRARY_SOURCE + "\n-- edited\n") is Outcome.REPLACED  # same version, other code
    assert plan(variant(LIBRARY_VERSION + 1)) is Outcome.NEWER
    assert plan(variant(LIBRARY_VERSION + 1), force=True) is Outcome.REPLACED
    assert library_version(variant(7)) == 7 and library_version("no version") is None


def test_ensure_library_loads_replaces_older_and_keeps_newer(r: redis.Redis) -> None:
    assert ensure_library(r) is Outcome.LOADED and current_code(r) == LIBRARY_SOURCE
    assert ensure_library(r) is Outcome.CURRENT
    r.function_load(variant(LIBRARY_VERSION - 1), replace=True)
    assert ensure_library(r) is Outcome.REPLACED and current_code(r) == LIBRARY_SOURCE
    newer = variant(LIBRARY_VERSION + 1)
    r.function_load(newer, replace=True)
    assert ensure_library(r) is Outcome.NEWER and current_code(r) == newer
    assert ensure_library(r, force=True) is Outcome.REPLACED and current_code(r) == LIBRARY_SOURCE


def test_headrace_functions_commands(r: redis.Redis, redis_url: str) -> None:
    env = {**os.environ, "HEADRACE_REDIS_URL": redis_url}

    def run(*args: str) -> str:
        proc = subprocess.run([EXE, "functions", *args], capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "loaded in Redis: none" in run("show")
    assert run("load").strip() == f"headrace function library version {LIBRARY_VERSION}: loaded"
    assert run("load").strip().endswith(": current")
    assert "loaded in Redis: this version" in run("show")
    assert run("source") == LIBRARY_SOURCE
    assert [lib[b"library_name"] if isinstance(lib, dict) else lib[1] for lib in r.function_list()] == [
        LIBRARY_NAME.encode()]


def test_a_worker_loads_the_function_and_its_limit_bounds_whole_entries(r: redis.Redis, redis_url: str) -> None:
    keys = ModelKeys("headrace", "affine")
    s = WorkerSettings(model="affine", redis_url=redis_url, consumer="fn-1", block_ms=100, max_wait_ms=2,
                       max_payload_bytes=2048)
    wt = WorkerThread(s, make_fake("affine")).start()
    try:
        poll_until(lambda: r.hget(keys.limits, "max_payload_bytes") == b"2048", 10, 0.02)
        assert current_code(r) == LIBRARY_SOURCE
        with Client(redis_url, timeout_s=10) as c:
            assert c.infer("affine", {"x": np.ones(4, np.float32)}).ok
            # A request whose body alone fits the worker's limit is still refused when the
            # whole entry does not: every field counts.
            with pytest.raises(E.PayloadTooLargeError, match="max_payload_bytes=2048"):
                c.submit("affine", {"x": np.ones(470, np.float32)}, request_id="r" * 128)  # body ~1.9 KB
            with pytest.raises(E.PayloadTooLargeError):
                c.submit("affine", {"x": np.ones(600, np.float32)})
    finally:
        wt.stop()
    assert r.xlen(keys.requests) == 1  # only the request that was answered


def test_without_the_function_a_producer_that_may_not_load_it_gets_a_clear_error(
        r: redis.Redis, redis_url: str) -> None:
    r.execute_command("ACL", "SETUSER", "fn-prod", "reset", "on", ">pw", "+ping", "+client|id", "+fcall",
                      "~headrace:*", "+xadd", "+xinfo|groups", "+xlen", "+hget", "+xread", "+xdel", "+del")
    url = redis_url.replace("redis://", "redis://fn-prod:pw@", 1)
    try:
        with Client(url, timeout_s=5, client_id="fnp") as c:
            with pytest.raises(E.BrokerError, match="headrace functions load"):
                c.submit("affine", {"x": np.ones(4, np.float32)})
        assert r.xlen(ModelKeys("headrace", "affine").requests) == 0
    finally:
        r.execute_command("ACL", "DELUSER", "fn-prod")


def test_the_function_runs_on_redis_cluster(redis_cluster: Any, redis_cluster_url: str) -> None:
    """Both keys of a submit carry the model's hash tag: one slot, so the function runs on
    the model's master (after it was loaded on every master, as docs/operations.md says)."""
    from redis.cluster import RedisCluster

    for url in redis_cluster.urls:
        node = redis.Redis.from_url(url)
        ensure_library(node, force=True)
        node.close()
    rc = RedisCluster.from_url(redis_cluster_url)
    try:
        for model in ("minilm", "affine", "digits"):
            keys = ModelKeys("headrace", model)
            fields = [b"v", b"1", b"id", b"c-1", b"reply_to", keys.reply("c").encode(), b"body", b"\x80"]
            node = rc.get_node_from_key(keys.requests)
            added, where = rc.execute_command("FCALL", "headrace_submit", 3, keys.requests, keys.limits, keys.inbox,
                                              "workers", 0, *fields, target_nodes=node)
            assert (added, where) == (1, b"inbox") and rc.llen(keys.inbox) == 1
            # The workers' relay: all four keys in the model's slot, too.
            relay_keys = [keys.requests, keys.limits, keys.inbox, keys.dlq]
            moved = rc.execute_command("FCALL", "headrace_relay", 4, *relay_keys, 10, "r", "c", "e", "d", "t", "b",
                                       "f", "0", target_nodes=node)
            assert moved == [1, 0, 0] and rc.xlen(keys.requests) == 1
    finally:
        rc.close()
