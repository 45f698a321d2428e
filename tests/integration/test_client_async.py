"""The asyncio SDK (AsyncClient) against a real private Redis with in-process fake workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import AsyncClient, InferenceFailed, QueueFull, ResultTimeout
from headrace.client import errors as E
from headrace.cluster.ops.embedded_redis import EmbeddedRedis
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs, start_fake_worker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def start_worker(redis_url: str) -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def start(kind: str = "affine", model: str | None = None) -> Any:
        w = start_fake_worker(redis_url, kind, model or kind)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def test_infer_submit_and_await_ticket(redis_url: str, start_worker: Callable[..., Any]) -> None:
    start_worker("affine")
    start_worker("length")
    async with AsyncClient(redis_url, reply_block_ms=200, timeout_s=15) as c:
        res = await c.infer("affine", affine_inputs(2))
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(2)["x"]))
        ticket = await c.submit("length", text="four")
        assert int((await ticket).outputs["length"][0]) == 4
        assert int((await c.result(ticket)).outputs["length"][0]) == 4
        with pytest.raises(InferenceFailed) as info:
            await c.infer("affine", {"x": np.zeros(2, np.float32)})
        assert info.value.code == E.BAD_SHAPE
        r = redis.Redis.from_url(redis_url)
        assert wait_until(lambda: r.xlen(c.reply_stream("affine")) == 0)


async def test_map_in_order_collect_and_results(redis_url: str, start_worker: Callable[..., Any]) -> None:
    start_worker("affine")
    async with AsyncClient(redis_url, max_in_flight=8, reply_block_ms=200, max_backlog=6) as c:
        # One request per item: a backlog limit of 6 samples is below one default chunk, and
        # the submits below would meet the samples-per-entry estimate of chunked entries.
        results = await c.map("affine", [affine_inputs(i) for i in range(80)], progress=False, chunk_size=1)
        for i, res in enumerate(results):
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))
        tickets = [await c.submit("affine", affine_inputs(i)) for i in range(5)]
        got = [r.request_id async for r in c.results(tickets, timeout_s=10)]
        assert sorted(got) == sorted(t.request_id for t in tickets)
        ordered = await c.collect(tickets)
        assert [r.request_id for r in ordered] == [t.request_id for t in tickets]


async def test_queue_full_and_timeouts_keep_tickets(redis_url: str, start_worker: Callable[..., Any]) -> None:
    async with AsyncClient(redis_url, max_backlog=2, reply_block_ms=200, require_registered=False) as c:
        t1 = await c.submit("affine", affine_inputs(1))
        await c.submit("affine", affine_inputs(2))
        with pytest.raises(QueueFull):
            await c.submit("affine", affine_inputs(3))
        with pytest.raises(ResultTimeout):
            await t1.wait(0.1)
        with pytest.raises(ResultTimeout):
            await c.collect([t1], timeout_s=0.1)
        assert not t1.done()
        start_worker("affine")
        res = await c.result(t1, 10)  # still collectable after the timeouts
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(1)["x"]))


async def test_async_reader_survives_redis_restart(private_redis: EmbeddedRedis) -> None:
    url = private_redis.url
    async with AsyncClient(url, reply_block_ms=200, timeout_s=20, reconnect_backoff_max_s=0.5,
                           require_registered=False) as c:
        tickets = [await c.submit("affine", affine_inputs(i)) for i in range(4)]
        while c._reader_conn_id is None:  # wait until the reader task is connected
            await asyncio.sleep(0.01)
        await asyncio.to_thread(private_redis.restart, crash=True, down_s=0.3)
        worker = start_fake_worker(url, "affine", "affine")
        try:
            results = await c.collect(tickets, timeout_s=20)
        finally:
            worker.stop()
        assert c.reconnects >= 1
        for i, res in enumerate(results):
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))
