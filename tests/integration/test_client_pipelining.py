"""Submit pipelining against a real private Redis: concurrent AsyncClient submits share round
trips, yet each caller keeps its own outcome; map/imap submit in batches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

import headrace.client.sync_io as sync_io_module
from headrace.client import AsyncClient, BrokerError, Client, QueueFull, Retry, flows
from headrace.client.functions import LIBRARY_NAME, current_code
from headrace.client.pipeline import run_submits
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs, start_fake_worker
from tests.support.worker import queued

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def affine_worker(redis_url: str) -> Iterator[Any]:
    w = start_fake_worker(redis_url, "affine", "affine")
    yield w
    w.stop()


async def test_concurrent_submits_are_coalesced_into_few_round_trips(redis_url: str, affine_worker: Any) -> None:
    async with AsyncClient(redis_url, reply_block_ms=200, timeout_s=20) as c:
        await c.infer("affine", affine_inputs(0))  # the reply stream exists: no reader wake-up below
        before = c._pipeline.flushes
        tickets = await asyncio.gather(*(c.submit("affine", affine_inputs(i)) for i in range(300)))
        # 300 submits of one pass: two pipelines (256 + 44), not 300 round trips
        assert c._pipeline.flushes - before == 2
        assert len({t.request_id for t in tickets}) == 300 and all(t.entry_id for t in tickets)
        results = await c.collect(tickets, timeout_s=20)
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))


async def test_queue_full_is_per_request_inside_one_pipeline(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    async with AsyncClient(redis_url, max_backlog=5, reply_block_ms=200, require_registered=False) as c:
        outcomes = await asyncio.gather(*(c.submit("affine", affine_inputs(i), request_id=f"req-{i}")
                                          for i in range(12)), return_exceptions=True)
        assert c._pipeline.flushes == 1
        accepted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        # the script runs in pipeline order: the first five fill the backlog, the rest are refused
        assert [t.request_id for t in accepted] == [f"req-{i}" for i in range(5)]
        assert len(refused) == 7 and all(isinstance(e, QueueFull) for e in refused)
        assert "req-9" in str(refused[4])
        assert queued(r, c.model_keys("affine")) == 5
        assert {t.request_id for t in c.outstanding()} == {f"req-{i}" for i in range(5)}


async def test_redis_dying_mid_flush_fails_every_caller_of_that_flush(private_redis: EmbeddedRedis) -> None:
    # No retries: each caller sees the failure of the pipeline it was in (retries are
    # tested in test_failure_drills.py).
    async with AsyncClient(private_redis.url, reply_block_ms=200, timeout_s=20, retry=Retry.none(),
                           reconnect_backoff_max_s=0.5, require_registered=False) as c:
        first = await c.submit("affine", affine_inputs(0))
        pipeline = c._pipeline
        execute = pipeline._execute
        calls = 0

        async def die_then_execute(commands: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.to_thread(private_redis.kill)
            return await execute(commands)

        pipeline._execute = die_then_execute  # type: ignore[method-assign]
        outcomes = await asyncio.gather(*(c.submit("affine", affine_inputs(i)) for i in range(1, 9)),
                                        return_exceptions=True)
        pipeline._execute = execute  # type: ignore[method-assign]
        assert calls == 1  # one pipeline carried all eight, and it failed as a whole
        assert all(isinstance(o, BrokerError) for o in outcomes), outcomes
        assert all("may or may not have been enqueued" in str(o) for o in outcomes)
        assert [t.request_id for t in c.outstanding()] == [first.request_id]  # the failed ones are not tracked

        # Redis comes back (the AOF kept the first request and the function library): the
        # next submits go through, and everything is answered.
        await asyncio.to_thread(private_redis.start)
        again = await asyncio.gather(*(c.submit("affine", affine_inputs(i)) for i in range(1, 9)))
        worker = start_fake_worker(private_redis.url, "affine", "affine")
        try:
            results = await c.collect([first, *again], timeout_s=20)
        finally:
            worker.stop()
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))


async def test_function_flush_is_survived_by_a_whole_pipeline(redis_url: str, affine_worker: Any) -> None:
    r = redis.Redis.from_url(redis_url)
    async with AsyncClient(redis_url, reply_block_ms=200, timeout_s=20) as c:
        await c.infer("affine", affine_inputs(0))
        r.function_delete(LIBRARY_NAME)
        tickets = await asyncio.gather(*(c.submit("affine", affine_inputs(i)) for i in range(20)))
        results = await c.collect(tickets, timeout_s=20)
    assert all(res.ok for res in results)
    assert r.xlen("headrace:{affine}:requests") <= 21  # nothing was added twice
    assert current_code(r) is not None  # loaded again by the client


def test_run_submits_reloads_the_function_after_function_flush(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    with Client(redis_url, require_registered=False) as c:
        c.submit("affine", affine_inputs(0))
        r.function_flush()
        tickets = [c._core.new_ticket("affine", affine_inputs(i), None, None, None) for i in range(1, 6)]
        errors = c._run(flows.send(c._core, tickets))  # one pipeline of five submits
        assert errors == [None] * 5
        assert queued(r, c.model_keys("affine")) == 6


def test_sync_map_submits_in_batches(redis_url: str, affine_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []

    def counting(r: redis.Redis, commands: Any) -> list[Any]:
        sizes.append(len(commands))
        return run_submits(r, commands)

    monkeypatch.setattr(sync_io_module, "run_submits", counting)
    n = 400
    with Client(redis_url, max_in_flight=64, reply_block_ms=200, timeout_s=20) as c:
        results = c.map("affine", [affine_inputs(i) for i in range(n)], progress=False, chunk_size=1)
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))
    assert sum(sizes) == n and sizes[0] == 64
    assert len(sizes) < n / 4, sizes  # round trips come in batches, not one per item


async def test_async_map_submits_in_batches(redis_url: str, affine_worker: Any) -> None:
    n = 400
    async with AsyncClient(redis_url, max_in_flight=64, reply_block_ms=200, timeout_s=20) as c:
        results = await c.map("affine", [affine_inputs(i) for i in range(n)], progress=False, chunk_size=1)
        assert c._pipeline.commands == n
        assert c._pipeline.flushes < n / 4
        chunked = await c.map("affine", [affine_inputs(i) for i in range(n)], progress=False, chunk_size=16)
        assert c._pipeline.commands == n + n // 16  # one submit per chunk of 16
        assert [r.outputs["y"].tolist() for r in chunked] == [r.outputs["y"].tolist() for r in results]
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))
