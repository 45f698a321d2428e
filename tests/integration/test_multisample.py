"""Multi-sample entries through real Redis, the submit function and worker threads: the
SDK's chunked map (sync and async), per-item errors in place, and backpressure counted in
samples."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from headrace.client import AsyncClient, Client, InferenceFailed, QueueFull
from headrace.client import errors as E
from headrace.client.chunks import Chunk, prepare_chunk
from headrace.client.submit import function_args
from headrace.workers.backends.fake import affine_reference
from tests.support.client import affine_inputs, start_fake_worker, wait_until
from tests.support.worker import queued

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def workers(redis_url: str) -> Iterator[None]:
    started = [start_fake_worker(redis_url, "affine", "affine"), start_fake_worker(redis_url, "length", "length")]
    yield
    for w in started:
        w.stop()


def test_map_sends_chunks_and_returns_one_result_per_item_in_order(redis_url: str, workers: None) -> None:
    texts = [f"text number {i}" for i in range(100)]
    texts[37] = "z" * 100_001  # too long: refused in its own slot
    with Client(redis_url, reply_block_ms=200, timeout_s=20) as c:
        results = c.map("length", texts, chunk_size=16, progress=False)
        assert len(results) == 100
        for i, res in enumerate(results):
            if i == 37:
                assert res.code == E.PAYLOAD_TOO_LARGE and not res.ok
            else:
                assert res.ok and int(res.outputs["length"][0]) == len(texts[i]), (i, res)
        assert len({r.request_id for r in results}) == 7  # ceil(100 / 16) entries
        with pytest.raises(InferenceFailed) as info:
            c.map("length", texts[30:40], chunk_size=16, progress=False, raise_on_error=True)
        assert info.value.code == E.PAYLOAD_TOO_LARGE
        items: list[Any] = [affine_inputs(i) for i in range(50)]
        items[20] = {"x": np.ones(3, np.float32)}  # another shape: breaks the chunk, sent alone
        out = list(c.imap("affine", items, chunk_size=8, progress=False))
    assert out[20].code == E.BAD_SHAPE
    for i, res in enumerate(out):
        if i != 20:
            np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))


def test_async_map_sends_chunks(redis_url: str, workers: None) -> None:
    async def go() -> list[Any]:
        async with AsyncClient(redis_url, reply_block_ms=200, timeout_s=20) as c:
            return await c.map("affine", [affine_inputs(i) for i in range(40)], chunk_size=10, progress=False)

    results = asyncio.run(go())
    assert len({r.request_id for r in results}) == 4
    for i, res in enumerate(results):
        np.testing.assert_array_equal(res.outputs["y"], affine_reference(affine_inputs(i)["x"]))


def test_backpressure_counts_samples_with_the_workers_published_mean(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    limits = "headrace:{affine}:limits"
    w = start_fake_worker(redis_url, "affine", "affine")
    try:
        with Client(redis_url, max_backlog=1000, reply_block_ms=200, timeout_s=20) as c:
            assert len(c.map("affine", [affine_inputs(i) for i in range(600)], chunk_size=60, progress=False)) == 600
            # the worker publishes the mean samples per entry it reads (moving average)
            assert wait_until(lambda: float(r.hget(limits, "samples_per_entry") or 0) > 20, 20)
    finally:
        w.stop()
    r.hset(limits, "samples_per_entry", "60")  # what the worker published for 60-sample entries
    with Client(redis_url, max_backlog=100, require_registered=False, reply_block_ms=200, timeout_s=20) as c:
        keys = c.model_keys("affine")
        chunk = Chunk(60, inputs={"x": np.zeros((60, 4), np.float32)})
        for i in range(3):
            prepared = prepare_chunk(keys, keys.reply(c.client_id), chunk, request_id=f"m{i}", deadline_s=0)
            k, argv = function_args(keys, prepared, 100)
            reply = r.fcall("headrace_submit", len(k), *k, *argv)
            # refused at or above the limit: 0, then 60 samples queued go in; 120 do not
            assert reply[0] == (0 if i == 2 else 1), reply
        length = queued(r, keys)
        with pytest.raises(QueueFull) as info:
            c.submit("affine", affine_inputs(0))
        assert info.value.backlog == 120 and queued(r, keys) == length  # nothing added
