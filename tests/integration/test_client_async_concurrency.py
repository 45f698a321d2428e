"""AsyncClient under more concurrent commands than its connection pool holds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from headrace.client import AsyncClient
from headrace.workers.backends.fake import AffineServable, affine_reference
from headrace.workers.engine.thread import WorkerThread
from headrace.workers.settings import WorkerSettings


@pytest.mark.timeout(60)
async def test_hundreds_of_concurrent_submits_wait_for_a_connection_instead_of_failing(redis_url: str) -> None:
    worker = WorkerThread(WorkerSettings(model="affine", redis_url=redis_url, max_batch=32, block_ms=100),
                          AffineServable()).start()
    try:
        async with AsyncClient(redis_url) as client:
            xs = [np.full(4, i, np.float32) for i in range(300)]
            tickets = await asyncio.gather(*(client.submit("affine", {"x": x}) for x in xs))
            results = await client.collect(tickets, timeout_s=30)
        assert [r.status for r in results] == ["ok"] * 300
        for x, r in zip(xs, results, strict=True):
            np.testing.assert_allclose(r.outputs["y"], affine_reference(x))
    finally:
        worker.stop()
