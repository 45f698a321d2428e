"""The SDK's failure drills, with real Redis and real worker processes
(``python -m headrace.workers --fake affine``), each with the outcome it must have:

* worker down then back: ``infer`` with a retry policy returns the answer; callers that gave
  up (timeout, ``ticket.cancel()``, a cancelled asyncio task) cancelled their requests, and the
  worker skips every one of them (counted in its metrics) instead of computing it for nobody;
* Redis restarted: the first call on the pooled connections succeeds, sync and async;
* Redis lost its data: the retry policy recovers every request, ``outstanding()`` returns to 0;
* queue full: ``QueueFull`` carries its structured fields and names the setting as it was set.
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import (
    AsyncClient,
    BackoffPolicy,
    BrokerError,
    Client,
    QueueFull,
    RequestCancelled,
    ResultTimeout,
    Retry,
    UnavailableError,
)
from headrace.cluster.ops.embedded_redis import EmbeddedRedis, free_port
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs
from tests.support.procs import WorkerProc
from tests.support.worker import queued, queued_requests, records, wait_until, worker_procs

pytestmark = pytest.mark.timeout(90)

FAST = ("--block-ms", "100", "--max-wait-ms", "2", "--lease-s", "5", "--drain-timeout-s", "5")
# Retry every failure a retry can fix, quickly: a worker (or Redis) that comes back within a
# few seconds is waited out.
PATIENT = Retry(attempts=30, backoff=BackoffPolicy(base_s=0.05, cap_s=0.3))


@pytest.fixture
def spawn(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    with worker_procs(redis_url, tmp_path) as start:
        yield start


def _cancelled_count(port: int) -> float:
    """``headrace_request_cancelled_total`` of the worker serving metrics on ``port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.findall(r'^headrace_request_cancelled_total\{[^}]*model="affine"[^}]*\} ([0-9.e+]+)$', text, re.M)
    return sum(float(x) for x in found)


def _drained(r: redis.Redis, stream: str) -> bool:
    groups = r.xinfo_groups(stream)
    if r.llen(stream.removesuffix(":requests") + ":inbox"):
        return False  # requests not relayed yet
    return bool(groups) and all(int(g["lag"] or 0) == 0 and int(g["pending"]) == 0 for g in groups)


def _in_threads(fn: Callable[[int], Any], n: int) -> tuple[list[threading.Thread], dict[int, Any]]:
    out: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - the test inspects what each caller got
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, out


def test_worker_down_then_back(redis_url: str, tmp_path: Path, spawn: Callable[..., WorkerProc]) -> None:
    runs = tmp_path / "runs.txt"
    env = {"HEADRACE_FAKE_RECORD": str(runs), "HEADRACE_LOG_LEVEL": "WARNING"}
    first = spawn(*FAST, env=env)
    r = redis.Redis.from_url(redis_url)
    with Client(redis_url, reply_block_ms=200) as c:
        assert wait_until(lambda: c.model_status("affine").ready)
        assert c.infer("affine", affine_inputs(0)).ok
        first.signal(15)  # SIGTERM: the worker drains and leaves
        assert first.wait(30) == 0

        # While it is down: six callers retry; eight give up after 0.5 s (their infer cancels
        # its request), three cancel their tickets, two asyncio tasks are cancelled.
        retrying, got = _in_threads(lambda i: c.infer("affine", affine_inputs(100 + i), timeout_s=1.0,
                                                       retry=PATIENT), 6)
        quitters, quit_out = _in_threads(lambda i: c.infer("affine", affine_inputs(200 + i), timeout_s=0.5), 8)
        tickets = [c.submit("affine", affine_inputs(300 + i)) for i in range(3)]
        cancelled_ids = {t.request_id for t in tickets}
        for t in tickets:
            assert t.cancel() and t.cancelled()
            with pytest.raises(RequestCancelled):
                t.result(0)
        cancelled_ids |= asyncio.run(_cancelled_tasks(redis_url))
        for t in quitters:
            t.join(10)
        assert all(isinstance(e, ResultTimeout) and isinstance(e, TimeoutError) for e in quit_out.values())
        cancelled_ids |= {e.request_id for e in quit_out.values()}
        assert len(cancelled_ids) == 8 + 3 + 2
        outstanding = {t.request_id for t in c.outstanding()}
        assert not outstanding & cancelled_ids  # given up: no longer tracked
        assert len(outstanding) == 6  # the six retrying callers

        # the retrying callers submitted again (same ids) while the worker was away
        assert wait_until(lambda: queued(r, c.model_keys("affine")) >= 1 + 6 + 8 + 3 + 2 + 6)
        port = free_port()
        spawn(*FAST, "--metrics-port", str(port), env=env)
        for t in retrying:
            t.join(30)
        for i in range(6):
            res = got[i]
            assert not isinstance(res, BaseException), res
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(100 + i)["x"]))
        assert wait_until(lambda: _drained(r, c.model_keys("affine").requests), timeout_s=20)
        assert c.outstanding() == []

    ran = set(records(runs))
    assert not ran & cancelled_ids, "requests of callers that gave up were computed"
    assert wait_until(lambda: _cancelled_count(port) >= len(cancelled_ids), timeout_s=10)
    assert _cancelled_count(port) == len(cancelled_ids)  # each skipped once, counted in the metrics


async def _cancelled_tasks(url: str) -> set[str]:
    """Two ``infer`` tasks cancelled by their caller; returns their request ids."""
    async with AsyncClient(url, reply_block_ms=200) as ac:
        tasks = [asyncio.create_task(ac.infer("affine", affine_inputs(400 + i), request_id=f"aio-{i}",
                                              timeout_s=30)) for i in range(2)]
        r = redis.Redis.from_url(url)
        keys = ac.model_keys("affine")

        def enqueued() -> int:
            return sum(1 for f in queued_requests(r, keys) if f[b"id"].startswith(b"aio-"))

        while enqueued() < 2:  # both requests are queued, their callers waiting
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task
        assert ac.outstanding() == []
    return {"aio-0", "aio-1"}


@pytest.mark.parametrize("crash", [False, True])
def test_redis_restart_first_call_succeeds(private_redis: EmbeddedRedis, tmp_path: Path, crash: bool) -> None:
    url = private_redis.url
    with worker_procs(url, tmp_path) as start:
        start(*FAST, env={"HEADRACE_LOG_LEVEL": "WARNING"})
        with Client(url, reply_block_ms=200, timeout_s=30) as c:
            assert wait_until(lambda: c.model_status("affine").ready, timeout_s=30)
            # warm: the pool holds connections, the reader blocks in XREAD
            assert all(r.ok for r in c.map("affine", [affine_inputs(i) for i in range(20)], progress=False))
            private_redis.restart(crash=crash, down_s=0.2)
            # No SDK retry: the first call on the pool's dead connections must succeed by itself.
            res = c.infer("affine", affine_inputs(7), retry=Retry.none())
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(7)["x"]))
            assert c.ping()
        asyncio.run(_async_first_call(private_redis, crash))


async def _async_first_call(server: EmbeddedRedis, crash: bool) -> None:
    async with AsyncClient(server.url, reply_block_ms=200, timeout_s=30) as c:
        results = await asyncio.gather(*(c.infer("affine", affine_inputs(i)) for i in range(20)))
        assert all(r.ok for r in results)
        await asyncio.to_thread(server.restart, crash=crash, down_s=0.2)
        res = await c.infer("affine", affine_inputs(9), retry=Retry.none())
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(9)["x"]))


def test_redis_data_lost_retry_recovers_every_request(tmp_path: Path) -> None:
    with EmbeddedRedis(data_dir=tmp_path, appendonly=False) as server, worker_procs(server.url, tmp_path) as start:
        r = redis.Redis.from_url(server.url)
        with Client(server.url, reply_block_ms=200, require_registered=False, reconnect_backoff_max_s=0.5) as c:
            keys = c.model_keys("affine")
            callers, got = _in_threads(lambda i: c.infer("affine", affine_inputs(i), timeout_s=1.0,
                                                          retry=PATIENT), 20)
            mapped: dict[str, Any] = {}
            mapper = threading.Thread(target=lambda: mapped.setdefault("out", c.map(
                "affine", [affine_inputs(50 + i) for i in range(30)], timeout_s=1.0, retry=PATIENT,
                progress=False, chunk_size=10)), daemon=True)
            mapper.start()
            # 20 single requests and the map's 30 items as 3 multi-sample entries
            assert wait_until(lambda: queued(r, keys) >= 23)
            assert len(c.outstanding()) == 23
            server.restart()  # no persistence: requests, consumer group and registry are gone
            assert queued(r, keys) == 0
            start(*FAST, env={"HEADRACE_LOG_LEVEL": "WARNING"})
            for t in [*callers, mapper]:
                t.join(45)
            for i in range(20):
                res = got[i]
                assert not isinstance(res, BaseException), res
                np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))
            assert [res.outputs["y"].tolist() for res in mapped["out"]] == [
                affine_reference(affine_inputs(50 + i)["x"]).tolist() for i in range(30)]
            assert c.outstanding() == []
            assert c.reconnects >= 1


def test_queue_full_carries_structured_fields(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                              spawn: Callable[..., WorkerProc]) -> None:
    with Client(redis_url, max_backlog=3, require_registered=False) as c:
        for i in range(3):
            c.submit("affine", affine_inputs(i))
        with pytest.raises(QueueFull) as info:
            c.submit("affine", affine_inputs(9), request_id="refused-1")
        e = info.value
        assert (e.backlog, e.max_backlog, e.request_id, e.model) == (3, 3, "refused-1", "affine")
        assert e.retry_after_s > 0 and e.code == "queue_full"
        assert isinstance(e, UnavailableError) and not isinstance(e, BrokerError)
        assert "the max_backlog argument" in str(e) and "HEADRACE_MAX_BACKLOG" not in str(e)

        # With QueueFull in its retry policy, infer waits the queue out (at least
        # retry_after_s between tries) and is answered once a worker drains it.
        waiting, got = _in_threads(lambda i: c.infer("affine", affine_inputs(20), retry=PATIENT), 1)
        spawn(*FAST, env={"HEADRACE_LOG_LEVEL": "WARNING"})
        waiting[0].join(30)
        assert not isinstance(got[0], BaseException), got[0]
        np.testing.assert_array_equal(got[0].outputs["y"], affine_reference(affine_inputs(20)["x"]))

    monkeypatch.setenv("HEADRACE_MAX_BACKLOG", "1")
    r = redis.Redis.from_url(redis_url)
    r.delete("headrace:{other}:requests", "headrace:{other}:inbox")
    with Client(redis_url, require_registered=False) as env_client:
        env_client.submit("other", affine_inputs(0))
        with pytest.raises(QueueFull) as info:
            env_client.submit("other", affine_inputs(1))
        assert info.value.max_backlog == 1 and "HEADRACE_MAX_BACKLOG" in str(info.value)
        assert "argument" not in str(info.value)
